"""Probability-flow ODE samplers: ``dx/dt = v(x, t)`` from t0 (noise) to t1 (data) (REFERENCE.md section 3).

Fixed-step methods on a uniform or shifted grid (NFE per step): Euler (1), Heun (2), midpoint (2, = RF-Solver's
second-order Taylor update), RK4 (4), and FlowTurbo's pseudo-corrector (Heun whose velocity at the predicted point
is reused as the next step's first velocity: 1 per step + 1). Adaptive dopri5 uses atol/rtol; the NFE it reports
is counted, not derived from the step count. Euler/Heun/midpoint/RK4/dopri5 run on torchdiffeq.
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torchdiffeq import odeint

from pipeline.objective import SampleOutput
from pipeline.transport.core import ModelFn, Transport
from pipeline.transport.timesteps import time_grid

ODE_SOLVERS = ("euler", "heun", "midpoint", "rk4", "pseudo_corrector", "dopri5")
_TORCHDIFFEQ = {"euler": "euler", "heun": "heun2", "midpoint": "midpoint", "rk4": "rk4"}


class CountedField:
    """Wraps ``f(t, x)`` and counts its evaluations (the NFE)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn, self.nfe = fn, 0

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.fn(t, x)


def pseudo_corrector(f: Callable, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """FlowTurbo pseudo-corrector: ``x' = x + h/2 (v + v(x + h v, t + h))``, carrying ``v(x + h v, t + h)`` forward."""
    v = f(grid[0], x)
    for t, t_next in pairwise(grid):
        h = t_next - t
        v_pred = f(t_next, x + h * v)
        x = x + 0.5 * h * (v + v_pred)
        v = v_pred
    return x


def integrate(f: Callable, x0: torch.Tensor, solver: str, t0: float, t1: float, steps: int = 32,
              time_shift: float = 1.0, atol: float = 1e-6, rtol: float = 1e-3) -> torch.Tensor:
    """Integrate ``dx/dt = f(t, x)`` from t0 to t1 (either direction) and return x(t1)."""
    if solver not in ODE_SOLVERS:
        raise ValueError(f"sampler.solver={solver!r} is unknown (allowed: {', '.join(ODE_SOLVERS)})")
    if solver == "dopri5":
        # dopri5's initial step heuristic may probe beyond t1 (where e.g. VP's sigma is NaN): clamp t to the span
        lo, hi = min(t0, t1), max(t0, t1)
        f_in = f
        f = lambda t, x: f_in(t.clamp(lo, hi), x)
        span = torch.tensor([t0, t1], dtype=x0.dtype, device=x0.device)
        return odeint(f, x0, span, method="dopri5", atol=atol, rtol=rtol)[-1]
    grid = time_grid(t0, t1, steps, time_shift, dtype=x0.dtype, device=x0.device)
    if solver == "pseudo_corrector":
        return pseudo_corrector(f, x0, grid)
    return odeint(f, x0, grid[[0, -1]], method=_TORCHDIFFEQ[solver],
                  options={"grid_constructor": lambda *_: grid})[-1]


class ODESampler:
    """Deterministic sampler: integrates the transport's velocity over its sampling interval."""

    def __init__(self, transport: Transport, solver: str = "euler", steps: int = 32, atol: float = 1e-6,
                 rtol: float = 1e-3, time_shift: float = 1.0):
        if solver not in ODE_SOLVERS:
            raise ValueError(f"sampler.solver={solver!r} is unknown (allowed: {', '.join(ODE_SOLVERS)})")
        if steps < 1:
            raise ValueError(f"sampler.steps={steps} must be >= 1")
        self.transport, self.solver, self.steps = transport, solver, steps
        self.atol, self.rtol, self.time_shift = atol, rtol, time_shift

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, x0: torch.Tensor, *, t_start: float | None = None,
               generator: torch.Generator | None = None, **model_kwargs) -> SampleOutput:
        """Map noise ``x0`` (or a state at time ``t_start``) to data; ``generator`` is unused (deterministic)."""
        t0, t1 = self.transport.sample_interval(sde=False)
        if t_start is not None:
            t0 = float(t_start)
        f = CountedField(lambda t, x: self.transport.velocity(model_fn, x, t, **model_kwargs))
        x = integrate(f, x0, self.solver, t0, t1, self.steps, self.time_shift, self.atol, self.rtol)
        return SampleOutput(x=x, nfe=f.nfe)
