"""Few-step flow-map sampling: ``x <- x + (s_{k+1} - s_k) u(x, s_k, s_{k+1})`` on the grid of :mod:`.times`.

K steps are K network calls (one batch each; with classifier-free guidance the conditional and unconditional
halves share that call): ``u = u_u + w (u_c - u_u)`` where ``s_k`` lies in ``[t_min, t_max]``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.config import GuidanceConfig
from pipeline.families import SampleOutput
from pipeline.flow_map.times import sampling_grid

FlowMapFn = Callable[..., torch.Tensor]  # (x, s, r, y=None) -> u(x, s, r | y)


def guided_flow_map(u_fn: FlowMapFn, null_label: int, guidance: GuidanceConfig) -> FlowMapFn:
    """Classifier-free guidance on the average velocity, one doubled batch per call."""
    def fn(x: torch.Tensor, s: torch.Tensor, r: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        inside = guidance.t_min <= float(s[0]) <= guidance.t_max
        if y is None or guidance.scale == 1.0 or not inside:
            return u_fn(x, s, r, y=y)
        cond, uncond = u_fn(torch.cat([x, x]), torch.cat([s, s]), torch.cat([r, r]),
                            y=torch.cat([y, torch.full_like(y, null_label)])).chunk(2)
        return uncond + guidance.scale * (cond - uncond)

    return fn


@torch.no_grad()
def sample_flow_map(u_fn: FlowMapFn, x0: torch.Tensor, steps: int, time_shift: float = 1.0,
                    y: torch.Tensor | None = None) -> SampleOutput:
    """Jump from noise ``x0`` (t = 0) to data (t = 1) in ``steps`` flow-map steps."""
    grid = sampling_grid(steps, time_shift)
    x = x0
    for k in range(steps):
        s = torch.full((x.shape[0],), float(grid[k]), dtype=x.dtype, device=x.device)
        r = torch.full_like(s, float(grid[k + 1]))
        x = x + float(grid[k + 1] - grid[k]) * u_fn(x, s, r, y=y)
    return SampleOutput(x=x, nfe=steps)
