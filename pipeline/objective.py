"""The seam between a model family and the training/sampling loop.

An objective turns a batch into a scalar loss and turns conditioning into samples. The training worker,
evaluation and the privacy stage only talk to this interface, so SiT (transport), DFM (multiscale) and FLUX
plug in side by side. Each family registers a :class:`pipeline.families.FamilySpec` (objective builder + the
settings it honours) from its own module:

- ``sit`` / ``SiT-*`` / ``DiT-*``: :mod:`pipeline.transport.objective` (interpolant + prediction + sampler)
- ``dfm``: :mod:`pipeline.transport.multiscale`
- ``flux``: :mod:`pipeline.flux.family` (plain or two-stage DFM FLUX objective)
- ``objective.name=flow_map`` (SiT only): :mod:`pipeline.flow_map.family` (its own family, with its own honoured
  settings; :class:`pipeline.flow_map.objective.FlowMapObjective`)

A new family (or objective) adds its module to :data:`FAMILY_MODULES` and calls ``register_family`` there.
"""
from __future__ import annotations

import importlib

from pipeline.config import TrainJobConfig
from pipeline.families import FamilySpec, Objective, SampleOutput, check_settings

__all__ = ["FAMILY_MODULES", "Objective", "SampleOutput", "build_objective", "load_families", "validate_settings"]

FAMILY_MODULES = ["pipeline.transport.objective", "pipeline.transport.multiscale", "pipeline.flux.family",
                  "pipeline.flow_map.family"]


def load_families() -> None:
    """Import every family module (each registers its :class:`~pipeline.families.FamilySpec`)."""
    for name in FAMILY_MODULES:
        importlib.import_module(name)


def validate_settings(cfg: TrainJobConfig) -> FamilySpec:
    """Refuse, in one line naming setting, value and family, any setting ``cfg``'s model family would ignore."""
    load_families()
    return check_settings(cfg)


def build_objective(cfg: TrainJobConfig, num_classes: int) -> Objective:
    """The objective of ``cfg``'s family (``model.name`` under ``objective.name``), after :func:`validate_settings`."""
    return validate_settings(cfg).build(cfg, num_classes)
