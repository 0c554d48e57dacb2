"""``TransportObjective``: the SiT objective behind the :class:`pipeline.objective.Objective` seam.

``loss``: mean transport loss of ``model(x_t, t, y=label)`` on ``batch["image"]`` (x1).
``sample``: x0 ~ N(0, I) from the generator, classifier-free guidance when ``guidance.scale != 1``
(null label = num_classes), then the configured ODE/SDE sampler.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import GuidanceConfig, TrainJobConfig
from pipeline.objective import SampleOutput
from pipeline.transport.core import Transport, build_transport
from pipeline.transport.guidance import guided
from pipeline.transport.sampling import Sampler, build_sampler


class TransportObjective:
    def __init__(self, transport: Transport, sampler: Sampler, guidance: GuidanceConfig | None = None,
                 num_classes: int | None = None):
        self.transport, self.sampler = transport, sampler
        self.guidance = guidance or GuidanceConfig()
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg: TrainJobConfig, num_classes: int) -> TransportObjective:
        transport = build_transport(cfg.transport, patch_size=cfg.model.patch_size)
        return cls(transport, build_sampler(transport, cfg.sampler), cfg.guidance, num_classes)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x1 = batch["image"]
        kw = {"y": batch["label"]} if "label" in batch else {}
        return self.transport.training_loss(model, x1, **kw).loss.mean()

    def sample(self, model: nn.Module, cond: dict[str, torch.Tensor], shape: tuple[int, ...],
               generator: torch.Generator | None = None) -> SampleOutput:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        g_dev = generator.device if generator is not None else device
        x0 = torch.randn(shape, generator=generator, device=g_dev).to(device=device, dtype=dtype)
        model_fn, kw = model, {}
        if "label" in cond:
            kw["y"] = cond["label"].to(device)
            g = self.guidance
            if g.scale != 1.0:
                if self.num_classes is None:
                    raise ValueError("guidance.scale != 1 needs a class-conditional model (num_classes)")
                model_fn = guided(model, self.num_classes, g.scale, g.t_min, g.t_max)
        return self.sampler.sample(model_fn, x0, generator=generator, **kw)
