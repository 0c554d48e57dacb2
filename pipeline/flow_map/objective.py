"""``FlowMapObjective``: a SiT trained as a flow map, behind the :class:`pipeline.objective.Objective` seam.

``loss``: a pair ``x1`` (data), ``x0 ~ N(0, I)``, times ``(s, r)`` (:mod:`.times`), ``x_s = s x1 + (1 - s) x0``
(linear path), labels dropped with ``model.class_dropout_prob`` once per sample (every forward pass of the step
sees the same labels), ``v`` = ``x1 - x0`` (``flow_map.target=data``) or the teacher's velocity at ``x_s``
(``target=teacher``); the network ``u_theta(x, s, r) = model(x, s, y, target_time=r, decoupled_blocks=k)``
regresses ``sg(v + (r - s) d/ds u_theta)`` with MeanFlow's adaptive weight (:mod:`.identity`).

``sample``: ``sampler.method=flow_map`` jumps in ``sampler.steps`` steps (:mod:`.sampler`); any other method
integrates the instantaneous velocity ``u(x, t, t)`` (= the plain forward pass) with the transport samplers, so
a flow-map checkpoint can still be sampled as a flow model.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ConfigError, TrainJobConfig, flow_map_refusal
from pipeline.flow_map.identity import adaptive_loss, meanflow_target, u_and_derivative
from pipeline.flow_map.sampler import guided_flow_map, sample_flow_map
from pipeline.flow_map.teacher import load_teacher, teacher_velocity
from pipeline.flow_map.times import sample_pairs
from pipeline.transport.timesteps import image_tokens, resolve_time_shift
from pipeline.families import SampleOutput


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


class FlowMapObjective:
    def __init__(self, cfg: TrainJobConfig, num_classes: int):
        refusal = flow_map_refusal(cfg)
        if refusal:
            raise ConfigError(refusal)
        self.cfg, self.fm, self.num_classes = cfg, cfg.flow_map, num_classes
        self.k = cfg.flow_map.decoupled_blocks
        self.teacher: nn.Module | None = None
        self.flow = None  # the transport objective, for sampler.method=ode|sde
        if cfg.sampler.method != "flow_map":
            from pipeline.transport import TransportObjective

            self.flow = TransportObjective.from_config(cfg, num_classes)

    @classmethod
    def from_config(cls, cfg: TrainJobConfig, num_classes: int) -> FlowMapObjective:
        return cls(cfg, num_classes)

    # ---------------------------------------------------------------- training

    def _drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        y = torch.where(y < 0, torch.full_like(y, self.num_classes), y)
        p = self.cfg.model.class_dropout_prob
        if p <= 0:
            return y
        return torch.where(torch.rand(y.shape[0], device=y.device) < p, torch.full_like(y, self.num_classes), y)

    def _velocity(self, x1: torch.Tensor, x0: torch.Tensor, xs: torch.Tensor, s: torch.Tensor,
                  y: torch.Tensor | None) -> torch.Tensor:
        if self.fm.target == "data":
            return x1 - x0
        if self.teacher is None:
            self.teacher = load_teacher(self.cfg, in_channels=x1.shape[1], input_size=x1.shape[-1],
                                        num_classes=self.num_classes, device=x1.device)
        return teacher_velocity(self.teacher, xs, s, y, self.num_classes, self.fm.teacher_guidance).to(xs.dtype)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x1 = batch["image"]
        y = self._drop_labels(batch["label"]) if "label" in batch else None
        x0 = torch.randn_like(x1)
        s, r = sample_pairs(self.fm, x1.shape[0], device=x1.device)
        s, r = s.to(x1.dtype), r.to(x1.dtype)
        xs = _bcast(s, x1) * x1 + (1 - _bcast(s, x1)) * x0
        v = self._velocity(x1, x0, xs, s, y)

        def u_fn(x: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
            return model(x, s_, y=y, target_time=r, decoupled_blocks=self.k, label_dropout=False)

        u, du_ds = u_and_derivative(u_fn, xs, s, v, self.fm.jvp, self.fm.fd_eps)
        return adaptive_loss(u, meanflow_target(du_ds, v, s, r), self.fm.weight_power, self.fm.weight_eps)

    # ---------------------------------------------------------------- sampling

    def sample(self, model: nn.Module, cond: dict[str, torch.Tensor], shape: tuple[int, ...],
               generator: torch.Generator | None = None) -> SampleOutput:
        if self.flow is not None:
            return self.flow.sample(model, cond, shape, generator)
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        g_dev = generator.device if generator is not None else device
        x0 = torch.randn(shape, generator=generator, device=g_dev).to(device=device, dtype=dtype)

        def u_fn(x: torch.Tensor, s: torch.Tensor, r: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            return model(x, s, y=y, target_time=r, decoupled_blocks=self.k)

        y = cond["label"].to(device) if "label" in cond else None
        fn = guided_flow_map(u_fn, self.num_classes, self.cfg.guidance) if y is not None else u_fn
        patch = getattr(getattr(model, "module", model), "patch_size", self.cfg.model.patch_size)
        shift = resolve_time_shift(self.cfg.sampler.time_shift, image_tokens(shape[2:], patch), default=1.0)
        return sample_flow_map(fn, x0, self.cfg.sampler.steps, shift, y=y)
