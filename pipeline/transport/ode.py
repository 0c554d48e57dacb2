"""Probability-flow ODE samplers: ``dx/dt = v(x, t)`` from t0 (noise) to t1 (data) (REFERENCE.md section 3).

Fixed-step methods on a uniform or shifted grid (NFE per step): Euler (1), Heun (2), midpoint (2, = RF-Solver's
second-order Taylor update), RK4 (4), and FlowTurbo's pseudo-corrector (Heun whose velocity at the predicted point
is reused as the next step's first velocity: 1 per step + 1). Euler/Heun/midpoint/RK4 run on torchdiffeq.

Adaptive dopri5 (Dormand-Prince 5(4), FSAL) is :func:`dopri5_per_sample`: every sample has its own time and step
size and its own error test ``rms(err / (atol + rtol max(|x|, |x_new|))) <= 1`` (the norm is taken per sample,
over that sample's dimensions only), so a sample's result does not depend on its batch-mates. The NFE it reports
is counted (batched evaluations), not derived from the step count.
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torchdiffeq import odeint

from pipeline.families import SampleOutput
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


# Dormand-Prince 5(4) tableau (Hairer, Norsett & Wanner, Solving ODEs I, Table 5.2)
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = ((),
         (1 / 5,),
         (3 / 40, 9 / 40),
         (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)  # 5th order (= last row of A)
_DP_E = tuple(b - bs for b, bs in zip(_DP_B, (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200,
                                              187 / 2100, 1 / 40)))  # 5th - embedded 4th order
SAFETY, MIN_FACTOR, MAX_FACTOR, MAX_ATTEMPTS = 0.9, 0.2, 10.0, 100_000


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square over every dimension but the first."""
    return x.flatten(1).pow(2).mean(1).sqrt()


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def dopri5_per_sample(f: Callable, x0: torch.Tensor, t0: float, t1: float, atol: float = 1e-6,
                      rtol: float = 1e-3) -> torch.Tensor:
    """Integrate ``dx/dt = f(t[B], x)`` from t0 to t1 (either direction) with per-sample adaptive steps.

    Initial step: Hairer's heuristic per sample (one extra evaluation). Step-size update
    ``h <- h min(10, max(0.2, 0.9 r^(-1/5)))`` with ``r`` the sample's error ratio; rejected samples keep their
    state and retry with the smaller step, accepted ones advance; finished samples idle (``h = 0``).
    """
    b = x0.shape[0]
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    x = x0
    t = torch.full((b,), float(t0), dtype=x0.dtype, device=x0.device)
    done_at = torch.full_like(t, float(t1))

    def scale(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return atol + rtol * torch.maximum(a.abs(), c.abs())

    k1 = f(t, x)
    # Hairer's initial step, per sample
    sc = scale(x, x)
    d0, d1 = _rms(x / sc), _rms(k1 / sc)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).clamp(max=span)
    x_probe = x + direction * _per_sample(h0, x) * k1
    d2 = _rms((f(t + direction * h0, x_probe) - k1) / sc) / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / big) ** 0.2)
    h = torch.minimum(100 * h0, h1)
    for _ in range(MAX_ATTEMPTS):
        remaining = (done_at - t) * direction
        active = remaining > 1e-12 * max(1.0, span)
        if not bool(active.any()):
            return x
        h = torch.where(active, torch.minimum(h, remaining), torch.zeros_like(h))
        hb = _per_sample(h * direction, x)
        ks = [k1]
        for i in range(1, 7):
            xi = x + hb * sum(a * k for a, k in zip(_DP_A[i], ks) if a != 0.0)
            ks.append(f(t + direction * _DP_C[i] * h, xi))
        x_new = x + hb * sum(bc * k for bc, k in zip(_DP_B, ks) if bc != 0.0)
        err = hb * sum(e * k for e, k in zip(_DP_E, ks) if e != 0.0)
        ratio = _rms(err / scale(x, x_new))
        accept = (ratio <= 1.0) & active & torch.isfinite(ratio)
        acc = _per_sample(accept, x)
        x = torch.where(acc, x_new, x)
        k1 = torch.where(acc, ks[6], k1)  # FSAL: the last stage is the next step's first
        t = torch.where(accept, torch.where(h >= remaining, done_at, t + direction * h), t)
        factor = torch.where(ratio == 0, torch.full_like(ratio, MAX_FACTOR),
                             (SAFETY * ratio.clamp_min(1e-300) ** -0.2).clamp(MIN_FACTOR, MAX_FACTOR))
        factor = torch.where(torch.isfinite(ratio), factor, torch.full_like(ratio, MIN_FACTOR))
        h = torch.where(accept, h * factor, h * torch.minimum(factor, torch.ones_like(factor)))
        if bool((active & (h < 1e-14 * max(1.0, span))).any()):
            raise RuntimeError(f"dopri5: step size underflow at t={float(t[active].min()):.6g} "
                               f"(atol={atol}, rtol={rtol}); the field is not finite or too stiff there")
    raise RuntimeError(f"dopri5: more than {MAX_ATTEMPTS} steps (atol={atol}, rtol={rtol})")


def integrate(f: Callable, x0: torch.Tensor, solver: str, t0: float, t1: float, steps: int = 32,
              time_shift: float = 1.0, atol: float = 1e-6, rtol: float = 1e-3) -> torch.Tensor:
    """Integrate ``dx/dt = f(t, x)`` from t0 to t1 (either direction) and return x(t1).

    Fixed-step solvers call ``f`` with a scalar time; dopri5 with one time per sample (shape [B]).
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"sampler.solver={solver!r} is unknown (allowed: {', '.join(ODE_SOLVERS)})")
    if solver == "dopri5":
        # the initial-step probe may reach beyond t1 (where e.g. VP's sigma is NaN): clamp t to the span
        lo, hi = min(t0, t1), max(t0, t1)
        f_in = f
        return dopri5_per_sample(lambda t, x: f_in(t.clamp(lo, hi), x), x0, t0, t1, atol, rtol)
    grid = time_grid(t0, t1, steps, time_shift, dtype=x0.dtype, device=x0.device)
    if solver == "pseudo_corrector":
        return pseudo_corrector(f, x0, grid)
    return odeint(f, x0, grid[[0, -1]], method=_TORCHDIFFEQ[solver],
                  options={"grid_constructor": lambda *_: grid})[-1]


class ODESampler:
    """Deterministic sampler: integrates the transport's velocity over its sampling interval."""

    def __init__(self, transport: Transport, solver: str = "euler", steps: int = 32, atol: float = 1e-6,
                 rtol: float = 1e-3, time_shift: float | str | None = 1.0):
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
        shift = self.transport.grid_shift(self.time_shift, x0)
        x = integrate(f, x0, self.solver, t0, t1, self.steps, shift, self.atol, self.rtol)
        return SampleOutput(x=x, nfe=f.nfe)
