"""``build_sampler``: the ODE or SDE sampler named by a :class:`~pipeline.config.SamplerConfig`."""
from __future__ import annotations

from typing import Protocol

import torch

from pipeline.config import SamplerConfig
from pipeline.families import SampleOutput
from pipeline.transport.core import ModelFn, Transport
from pipeline.transport.ode import ODESampler
from pipeline.transport.sde import SDESampler


class Sampler(Protocol):
    def sample(self, model_fn: ModelFn, x0: torch.Tensor, *, generator: torch.Generator | None = None,
               t_start: float | None = None, **model_kwargs) -> SampleOutput:
        """Integrate from noise ``x0`` (at the transport's t0, or ``t_start``) to data; reports the NFE."""


def build_sampler(transport: Transport, cfg: SamplerConfig) -> Sampler:
    """``cfg.method`` = ode (solver euler|heun|midpoint|rk4|pseudo_corrector|dopri5) or sde (euler|heun)."""
    if cfg.method == "ode":
        return ODESampler(transport, cfg.solver, cfg.steps, cfg.atol, cfg.rtol, cfg.time_shift)
    if cfg.method == "sde":
        return SDESampler(transport, cfg.solver, cfg.steps, cfg.diffusion, cfg.diffusion_norm, cfg.last_step,
                          cfg.last_step_size, cfg.time_shift)
    if cfg.method == "flow_map":
        raise ValueError("sampler.method=flow_map needs a flow-map model (objective.name=flow_map)")
    raise ValueError(f"sampler.method={cfg.method!r} is unknown (allowed: ode, sde, flow_map)")
