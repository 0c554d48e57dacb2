"""``TransportObjective``: the SiT objective behind the :class:`pipeline.families.Objective` seam, and the SiT
family's registration (which settings it honours, which values it refuses).

``loss``: mean transport loss of ``model(x_t, t, y=label)`` on ``batch["image"]`` (x1).
``sample``: x0 ~ N(0, I) from the generator, classifier-free guidance when ``guidance.scale != 1``
(null label = num_classes), then the configured ODE/SDE sampler.
Token counts (resolution shift of training times, ``sampler.time_shift=auto``) use the built model's patch size.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import GuidanceConfig, TrainJobConfig
from pipeline.families import (
    FamilySpec,
    Refusal,
    SampleOutput,
    conditional_transport_refusals,
    register_family,
    section_fields,
    unless,
)
from pipeline.models.sit import parse_named_config
from pipeline.transport.core import Transport, build_transport
from pipeline.transport.guidance import guided
from pipeline.transport.sampling import Sampler, build_sampler


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DeepSpeed engine / DDP wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def model_patch_size(cfg: TrainJobConfig) -> int:
    """The patch size the model of ``cfg`` is built with (a named ``SiT-XL/8`` has 8, whatever model.patch_size)."""
    named = parse_named_config(cfg.model.name)
    return named[1] if named is not None else cfg.model.patch_size


class TransportObjective:
    def __init__(self, transport: Transport, sampler: Sampler, guidance: GuidanceConfig | None = None,
                 num_classes: int | None = None, guided_channels: int | None = None):
        self.transport, self.sampler = transport, sampler
        self.guidance = guidance or GuidanceConfig()
        self.num_classes = num_classes
        self.guided_channels = guided_channels  # None: all channels (SiT's legacy preset guides the first 3)

    @classmethod
    def from_config(cls, cfg: TrainJobConfig, num_classes: int) -> TransportObjective:
        transport = build_transport(cfg.transport, patch_size=model_patch_size(cfg))
        return cls(transport, build_sampler(transport, cfg.sampler), cfg.guidance, num_classes,
                   guided_channels=cfg.guidance.channels)

    def _follow_model(self, model: nn.Module) -> None:
        patch = getattr(unwrap(model), "patch_size", None)
        if isinstance(patch, int) and patch > 0:
            self.transport.patch_size = patch

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._follow_model(model)
        x1 = batch["image"]
        kw = {"y": batch["label"]} if "label" in batch else {}
        return self.transport.training_loss(model, x1, **kw).loss.mean()

    def sample(self, model: nn.Module, cond: dict[str, torch.Tensor], shape: tuple[int, ...],
               generator: torch.Generator | None = None) -> SampleOutput:
        self._follow_model(model)
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
                model_fn = guided(model, self.num_classes, g.scale, g.t_min, g.t_max, channels=self.guided_channels)
        return self.sampler.sample(model_fn, x0, generator=generator, **kw)


# ---------------------------------------------------------------- the family's settings

SIZE_FIELDS = frozenset({"model.hidden_size", "model.depth", "model.num_heads", "model.patch_size", "model.mlp_ratio"})
SIT_MODEL = frozenset({"model.class_dropout_prob", "model.learn_sigma", "model.grad_checkpointing"})
SDE_ONLY = ("diffusion", "diffusion_norm", "last_step", "last_step_size")


def sampler_refusals(cfg: TrainJobConfig) -> list[Refusal]:
    """Sampler fields that mean nothing with the chosen method/solver (shared with families using these samplers)."""
    s, d = cfg.sampler, TrainJobConfig().sampler
    out: list[Refusal] = []
    if s.method == "ode":
        for key in SDE_ONLY:
            if getattr(s, key) != getattr(d, key):
                out.append(Refusal(f"sampler.{key}", getattr(s, key), "it applies to sampler.method=sde only"))
    for key in ("atol", "rtol"):
        if getattr(s, key) != getattr(d, key):
            out += unless(s.solver == "dopri5", f"sampler.{key}", getattr(s, key),
                          f"it applies to the adaptive solver dopri5 only (solver is {s.solver})")
    if s.solver == "dopri5" and s.time_shift not in (None, 1.0):
        out.append(Refusal("sampler.time_shift", s.time_shift, "dopri5 chooses its own steps (no grid to shift)"))
    return out


def guidance_refusals(cfg: TrainJobConfig) -> list[Refusal]:
    g, d = cfg.guidance, TrainJobConfig().guidance
    out: list[Refusal] = []
    for key in ("t_min", "t_max", "channels"):
        if key == "channels" and cfg.sampler.preset is not None:
            continue  # the preset's CFG convention, in effect whenever guidance is used
        if getattr(g, key) != getattr(d, key):
            out += unless(g.scale != 1.0, f"guidance.{key}", getattr(g, key),
                          "a guidance interval needs guidance.scale != 1")
    return out


def transport_refusals(cfg: TrainJobConfig) -> list[Refusal]:
    tr, d = cfg.transport, TrainJobConfig().transport
    out = conditional_transport_refusals(cfg)
    if tr.loss_weight != "none":
        out += unless(tr.prediction != "velocity", "transport.loss_weight", tr.loss_weight,
                      "loss weights apply to score/noise prediction only (prediction is velocity)")
    for key in ("logit_mean", "logit_std"):
        if getattr(tr, key) != getattr(d, key):
            out += unless(tr.time_sampler == "logit_normal", f"transport.{key}", getattr(tr, key),
                          f"it applies to transport.time_sampler=logit_normal only (time_sampler is {tr.time_sampler})")
    return out


def sit_refusals(cfg: TrainJobConfig) -> list[Refusal]:
    return transport_refusals(cfg) + sampler_refusals(cfg) + guidance_refusals(cfg)


SIT_HONOURS = (SIT_MODEL | frozenset(section_fields("transport")) | frozenset(section_fields("sampler"))
               | frozenset(section_fields("guidance")))
DFM_NOTE = "DFM settings apply to model.name=dfm (or flux with flux.dfm=true)"
FLUX_NOTE = "flux.* settings apply to model.name=flux"
_notes = {k: DFM_NOTE for k in section_fields("model") if k.startswith("model.dfm_")}
_notes.update({k: FLUX_NOTE for k in section_fields("flux")})

register_family(FamilySpec(
    name="sit", matches=lambda name: name.lower() == "sit", build=TransportObjective.from_config,
    honours=SIT_HONOURS | SIZE_FIELDS, refuse=sit_refusals, notes=_notes))
register_family(FamilySpec(
    name="SiT/DiT (named size)", matches=lambda name: parse_named_config(name) is not None,
    build=TransportObjective.from_config, honours=SIT_HONOURS, refuse=sit_refusals,
    notes={**_notes, **{k: "a named size fixes the architecture (use model.name=sit for a custom size)"
                        for k in SIZE_FIELDS}}))
