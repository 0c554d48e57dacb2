"""Model families and the settings they honour: the registry every objective sits on.

In the spirit of torchtitan's ``TrainSpec``: each family (SiT, DFM, FLUX, and later flow maps) registers a
:class:`FamilySpec` naming

- which ``model.name`` values it serves,
- how its objective is built (``build(cfg, num_classes) -> Objective``),
- which fields of the family-dependent config sections (:data:`FAMILY_SECTIONS`) it honours,
- and which values of honoured fields it refuses (``refuse(cfg) -> [Refusal]``).

:func:`check_settings` is the one place the rule "a setting is honoured or refused" is enforced: a field the
family does not honour must keep its schema default, otherwise the config is refused in one line naming the
setting, its value and the family. This module imports only the config: families import it, never the reverse,
so there is no import circle between the objective factory and the families.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from pipeline.config import ConfigError, TrainJobConfig

# config sections whose meaning depends on the model family (or objective); the other sections (JOB_SECTIONS and
# the top-level keys) are consumed by the job machinery the same way for every family. Every section of
# TrainJobConfig is in exactly one of the two, and every field of both is walked by behaviour
# (tests/test_settings_honoured.py: a field that changes nothing and is not refused fails it).
FAMILY_SECTIONS = ("model", "transport", "sampler", "guidance", "flux", "objective", "flow_map")
JOB_SECTIONS = ("data", "train", "samples", "eval", "tracking", "log")
SELECTORS = ("model.name", "objective.name")  # they pick the family; every family "honours" them


@dataclass
class SampleOutput:
    x: torch.Tensor  # samples in data space (pixels in [-1, 1], or latents)
    nfe: int  # number of model function evaluations per sample


class Objective(Protocol):
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss for one batch (``image``/``label`` for SiT and DFM; FLUX keys for FLUX)."""

    def sample(self, model: nn.Module, cond: dict[str, torch.Tensor], shape: tuple[int, ...],
               generator: torch.Generator | None = None) -> SampleOutput:
        """Generate ``shape`` samples given conditioning (``label`` for class-conditional models)."""


@dataclass(frozen=True)
class Refusal:
    """A setting a family cannot honour with this value (or in this combination)."""

    key: str  # dotted config key, e.g. "transport.path"
    value: Any
    reason: str


def no_refusals(cfg: TrainJobConfig) -> list[Refusal]:
    return []


@dataclass(frozen=True)
class FamilySpec:
    name: str  # shown in refusals: "sit", "SiT (named sizes)", "dfm", "flux", "flow_map"
    matches: Callable[[str], bool]  # does this family serve ``model.name``?
    build: Callable[[TrainJobConfig, int], Objective]
    honours: frozenset[str]  # dotted keys of FAMILY_SECTIONS fields this family uses
    refuse: Callable[[TrainJobConfig], Iterable[Refusal]] = no_refusals
    notes: dict[str, str] = field(default_factory=dict)  # key -> what to use instead, shown in refusals
    objective: str = "family"  # the objective.name it serves: "family" (the model's own) or "flow_map"


_REGISTRY: list[FamilySpec] = []


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add (or replace, by name) a family; the newest registration is consulted first."""
    _REGISTRY[:] = [s for s in _REGISTRY if s.name != spec.name]
    _REGISTRY.insert(0, spec)
    return spec


def registered_families() -> list[FamilySpec]:
    return list(_REGISTRY)


def family_for(model_name: str, objective: str = "family") -> FamilySpec:
    """The family serving ``model.name`` under ``objective.name`` (one-line :class:`ConfigError` if none does)."""
    for spec in _REGISTRY:
        if spec.objective == objective and spec.matches(model_name.strip()):
            return spec
    names = ", ".join(s.name for s in _REGISTRY if s.objective == objective) or "none registered"
    if objective != "family":
        raise ConfigError(f"config error: objective.name={objective} does not serve model.name={model_name!r} "
                          f"(families with it: {names})")
    raise ConfigError(f"config error: model.name={model_name!r} belongs to no model family (families: {names})")


def family_of(cfg: TrainJobConfig) -> FamilySpec:
    return family_for(cfg.model.name, cfg.objective.name)


def section_fields(section: str) -> list[str]:
    """Dotted keys of one config section's fields."""
    model = TrainJobConfig.model_fields[section].annotation
    return [f"{section}.{name}" for name in model.model_fields]


def family_keys() -> list[str]:
    """Every dotted key of the family-dependent sections."""
    return [key for section in FAMILY_SECTIONS for key in section_fields(section)]


def get_key(cfg: TrainJobConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def refusals(cfg: TrainJobConfig, spec: FamilySpec | None = None) -> list[Refusal]:
    """Everything ``cfg`` asks of its family that the family does not do (empty when all is honoured)."""
    spec = spec or family_of(cfg)
    default = TrainJobConfig()
    out = []
    for key in family_keys():
        if key in SELECTORS or key in spec.honours:
            continue
        value = get_key(cfg, key)
        if value != get_key(default, key):
            hint = spec.notes.get(key, "")
            out.append(Refusal(key, value, f"it has no effect on this family{'; ' + hint if hint else ''}"))
    out.extend(spec.refuse(cfg))
    out.extend(null_label_refusals(cfg, spec))
    return out


def null_label_refusals(cfg: TrainJobConfig, spec: FamilySpec) -> list[Refusal]:
    """Classifier-free guidance ``v_u + w (v_c - v_u)`` needs ``v_u``, the model at the null label, which it learns
    only when labels are dropped in training (``model.class_dropout_prob > 0``); families whose unconditional branch
    is not the null label (FLUX: empty-prompt embeddings) do not honour ``model.class_dropout_prob``."""
    if cfg.guidance.scale == 1.0 or "model.class_dropout_prob" not in spec.honours:
        return []
    if cfg.model.class_dropout_prob == 0:
        return [Refusal("guidance.scale", cfg.guidance.scale,
                        "the null label was never trained (model.class_dropout_prob=0), so there is no unconditional "
                        "model to guide away from")]
    return []


def refusal_line(r: Refusal, family: str) -> str:
    value = r.value if isinstance(r.value, str) else repr(r.value)
    return f"config error: {r.key}={value} is not honoured by model family {family}: {r.reason}"


def check_settings(cfg: TrainJobConfig) -> FamilySpec:
    """Refuse (one line, :class:`ConfigError`) the first setting ``cfg``'s family would ignore; returns the family."""
    spec = family_of(cfg)
    found = refusals(cfg, spec)
    if found:
        raise ConfigError(refusal_line(found[0], spec.name))
    return spec


def unless(condition: bool, key: str, value: Any, reason: str) -> list[Refusal]:
    """``[Refusal]`` when ``condition`` is false (a small helper for ``refuse`` functions)."""
    return [] if condition else [Refusal(key, value, reason)]


def conditional_transport_refusals(cfg: TrainJobConfig) -> list[Refusal]:
    """Transport fields that only mean something together with another setting (shared by the families)."""
    tr, default = cfg.transport, TrainJobConfig().transport
    out: list[Refusal] = []
    if tr.polynomial_n != default.polynomial_n:
        out += unless(tr.path == "polynomial", "transport.polynomial_n", tr.polynomial_n,
                      f"it applies to transport.path=polynomial only (path is {tr.path})")
    for key in ("vp_beta_min", "vp_beta_max"):
        if getattr(tr, key) != getattr(default, key):
            out += unless(tr.path == "vp", f"transport.{key}", getattr(tr, key),
                          f"it applies to transport.path=vp only (path is {tr.path})")
    if tr.mode_scale != default.mode_scale:
        out += unless(tr.time_sampler == "mode", "transport.mode_scale", tr.mode_scale,
                      f"it applies to transport.time_sampler=mode only (time_sampler is {tr.time_sampler})")
    return out
