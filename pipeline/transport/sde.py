"""SDE samplers (SiT): ``dx = [v(x, t) + D(t) s(x, t)] dt + sqrt(2 D(t)) dW`` from t0 (noise) towards data.

For every D >= 0 the marginals equal those of the probability-flow ODE (Fokker-Planck: the D terms cancel), so
the diffusion coefficient is a sampling-time choice. Forms (n = diffusion norm; REFERENCE.md section 3):
constant ``n``; sbdm ``n drift_var(t)`` (Linear: ``n (1-t)/t``); sigma ``n sigma(t)``; linear ``n (1 - t)``;
decreasing ``(n cos(pi t) + 1)^2 / 4``; increasing_decreasing ``n sin^2(pi t)``.

Euler-Maruyama (1 NFE/step) or stochastic Heun (noise first, then a Heun step on the drift: 2 NFE/step) run on
``[t0, 1 - h_last]`` (``h_last`` = last_step_size, or sample_eps when last_step = none); the last step is
none / mean ``x + drift h_last`` / tweedie ``E[x1 | x]`` / euler ``x + v h_last``.

Stiff steps. The ``D s`` part pulls x towards ``m = x + sigma^2 s = alpha E[x1 | x]`` at rate ``lam = D / sigma^2``
(the score of the Gaussian around m). Euler-Maruyama multiplies ``x - m`` by ``1 - lam h``: where D is unbounded
(SBDM near t0: ``lam ~ 1/t``, 32 steps from t0 = 1e-3 give a factor of about -29) the state blows up. A step with
``lam h > OU_GUARD`` therefore takes the exact Ornstein-Uhlenbeck solution of ``dx = -lam (x - m) dt +
sqrt(2 D) dW`` with m held fixed over the step, plus the Euler ``v`` step:
``x + h v + (1 - e^{-lam h}) sigma^2 s + sigma sqrt(1 - e^{-2 lam h}) xi`` (1 NFE). It agrees with Euler-Maruyama
to first order in ``lam h`` and keeps the state's variance bounded for any D; SiT's own settings (250 steps, sigma
form, ``lam h < 0.1``) never reach the guard, so they are reproduced exactly.
"""
from __future__ import annotations

import math
from itertools import pairwise

import torch

from pipeline.families import SampleOutput
from pipeline.transport.core import ModelFn, Transport
from pipeline.transport.timesteps import time_grid

OU_GUARD = 0.5  # lam h above which a step is the exact OU sub-step (Euler-Maruyama's 1 - lam h would overshoot)
DIFFUSIONS = ("constant", "sbdm", "sigma", "linear", "decreasing", "increasing_decreasing")
LAST_STEPS = ("none", "mean", "tweedie", "euler")


def diffusion_coefficient(transport: Transport, form: str, norm: float, t: torch.Tensor) -> torch.Tensor:
    """D(t) of the named form (elementwise in t)."""
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "sbdm":
        return norm * transport.path.drift_var(t)
    if form == "sigma":
        return norm * transport.path.sigma(t)
    if form == "linear":
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
    if form == "increasing_decreasing":
        return norm * torch.sin(math.pi * t) ** 2
    raise ValueError(f"sampler.diffusion={form!r} is unknown (allowed: {', '.join(DIFFUSIONS)})")


class SDESampler:
    """Stochastic sampler with a chosen diffusion coefficient and last step."""

    def __init__(self, transport: Transport, solver: str = "euler", steps: int = 32, diffusion: str = "sigma",
                 diffusion_norm: float = 1.0, last_step: str = "mean", last_step_size: float = 0.04,
                 time_shift: float | str | None = 1.0):
        if solver not in ("euler", "heun"):
            raise ValueError(f"sampler.solver={solver!r} is not an SDE solver (allowed: euler, heun)")
        if diffusion not in DIFFUSIONS:
            raise ValueError(f"sampler.diffusion={diffusion!r} is unknown (allowed: {', '.join(DIFFUSIONS)})")
        if last_step not in LAST_STEPS:
            raise ValueError(f"sampler.last_step={last_step!r} is unknown (allowed: {', '.join(LAST_STEPS)})")
        if steps < 1:
            raise ValueError(f"sampler.steps={steps} must be >= 1")
        self.transport, self.solver, self.steps = transport, solver, steps
        self.diffusion, self.norm = diffusion, diffusion_norm
        self.last_step, self.last_step_size, self.time_shift = last_step, last_step_size, time_shift

    def interval(self) -> tuple[float, float]:
        """(t0, t_end) of the stochastic part; the last step (if any) goes from t_end to 1."""
        t0, t1 = self.transport.sample_interval(sde=True, diffusion=self.diffusion)
        t_end = t1 if self.last_step == "none" else 1.0 - self.last_step_size
        if not t_end > t0:
            raise ValueError(f"sampler.last_step_size={self.last_step_size} leaves no room after t0={t0}")
        if self.diffusion == "sbdm":
            d0 = self.transport.path.drift_var(torch.tensor(t0, dtype=torch.float64))
            if not torch.isfinite(d0):
                raise ValueError(f"sampler.diffusion=sbdm diverges at t={t0} on path {self.transport.path.name}: "
                                 "set transport.sample_eps > 0")
        return t0, t_end

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, x0: torch.Tensor, *, generator: torch.Generator | None = None,
               t_start: float | None = None, **model_kwargs) -> SampleOutput:
        """Draw samples from noise ``x0`` (or a state at ``t_start``); Brownian increments use ``generator``."""
        return self.run(model_fn, x0, generator=generator, t_start=t_start, model_kwargs=model_kwargs)

    def trajectory(self, model_fn: ModelFn, x0: torch.Tensor, *, generator: torch.Generator | None = None,
                   **model_kwargs) -> list[torch.Tensor]:
        """The state after every step (the last step included), for diagnostics."""
        states: list[torch.Tensor] = []
        out = self.run(model_fn, x0, generator=generator, model_kwargs=model_kwargs, on_step=states.append)
        return [*states, out.x]

    @torch.no_grad()
    def run(self, model_fn: ModelFn, x0: torch.Tensor, *, generator: torch.Generator | None = None,
            t_start: float | None = None, model_kwargs: dict | None = None, on_step=None) -> SampleOutput:
        model_kwargs = model_kwargs or {}
        t0, t_end = self.interval()
        if t_start is not None:
            t0 = float(t_start)
        shift = self.transport.grid_shift(self.time_shift, x0)
        grid = time_grid(t0, t_end, self.steps, shift, dtype=x0.dtype, device=x0.device)
        tr, nfe = self.transport, 0

        def drift(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            nonlocal nfe
            nfe += 1
            v, s = tr.velocity_and_score(model_fn, x, t, **model_kwargs)
            return v + diffusion_coefficient(tr, self.diffusion, self.norm, t) * s

        def noise(x: torch.Tensor) -> torch.Tensor:
            dev = generator.device if generator is not None else x.device
            return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)

        x = x0
        for t, t_next in pairwise(grid):
            h = t_next - t
            d = diffusion_coefficient(tr, self.diffusion, self.norm, t)
            sigma = tr.path.sigma(t)
            lam_h = float(d / sigma**2 * h) if float(sigma) > 0 else math.inf
            if lam_h > OU_GUARD:  # stiff: exact OU sub-step for the D * score part
                nfe += 1
                v, s = tr.velocity_and_score(model_fn, x, t, **model_kwargs)
                decay = math.exp(-lam_h)
                x = x + h * v + (1 - decay) * sigma**2 * s + sigma * math.sqrt(1 - decay**2) * noise(x)
                if on_step is not None:
                    on_step(x)
                continue
            dw = noise(x) * torch.sqrt(h)
            if self.solver == "euler":
                x = x + drift(x, t) * h + torch.sqrt(2 * d) * dw
            else:
                x_hat = x + torch.sqrt(2 * d) * dw
                k1 = drift(x_hat, t)
                k2 = drift(x_hat + h * k1, t_next)
                x = x_hat + 0.5 * h * (k1 + k2)
            if on_step is not None:
                on_step(x)
        x = self._last(model_fn, x, grid[-1], model_kwargs)
        return SampleOutput(x=x, nfe=nfe + (self.last_step != "none"))

    def _last(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, kw: dict) -> torch.Tensor:
        tr, h = self.transport, 1.0 - t
        if self.last_step == "none":
            return x
        if self.last_step == "tweedie":
            return tr.denoised(model_fn, x, t, **kw)
        v, s = tr.velocity_and_score(model_fn, x, t, **kw)
        if self.last_step == "euler":
            return x + v * h
        return x + (v + diffusion_coefficient(tr, self.diffusion, self.norm, t) * s) * h  # mean
