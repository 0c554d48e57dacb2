"""The seam between a model family and the training/sampling loop.

An objective turns a batch into a scalar loss and turns conditioning into samples. The training worker,
evaluation and the privacy stage only talk to this interface, so SiT (transport), DFM (multiscale) and FLUX
plug in side by side:

- ``sit`` / ``SiT-*``: :class:`pipeline.transport.TransportObjective` (interpolant + prediction + sampler)
- ``dfm``: :class:`pipeline.transport.multiscale.DFMObjective`
- ``flux``: :class:`pipeline.flux.objective.FluxObjective`
- ``objective.name=flow_map`` (SiT only): :class:`pipeline.flow_map.objective.FlowMapObjective`
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from pipeline.config import TrainJobConfig


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


def build_objective(cfg: TrainJobConfig, num_classes: int) -> Objective:
    """Pick the objective that matches ``cfg.model.name`` (``objective.name=flow_map``: a SiT flow map)."""
    if cfg.objective.name == "flow_map":
        from pipeline.flow_map.objective import FlowMapObjective

        return FlowMapObjective.from_config(cfg, num_classes)
    name = cfg.model.name.lower()
    if name == "dfm":
        from pipeline.transport.multiscale import DFMObjective

        return DFMObjective.from_config(cfg, num_classes)
    if name == "flux":
        from pipeline.flux.objective import FluxObjective

        return FluxObjective.from_config(cfg)
    from pipeline.transport import TransportObjective

    return TransportObjective.from_config(cfg, num_classes)
