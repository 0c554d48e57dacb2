"""The privacy benchmark's protocol, as pure functions: settings checks, the warm-up plateau, the pool refresh that
re-denoises every copy a given number of times, FLOP counts and the matched budgets.

FLOPs (forward + backward + denoising): ``F`` = one sample's forward pass of the model (counted by
``torch.utils.flop_counter`` on the trained model); a sample-gradient (forward + backward) costs ``3 F``; one
denoising evaluation (forward only) costs ``F``. A run's FLOPs are ``3 F G + F D`` with G its sample-gradients and
D its denoising sample-evaluations, both counted by the privacy stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class BenchInputError(ValueError):
    """A benchmark setting that cannot give a meaningful comparison: one line, exit 2."""


NEEDS_CLEAN = ("clean_only", "sfbd", "sfbd_flow")


def check_settings(args: Any) -> None:
    """Refuse settings before anything runs (one line each)."""
    if not 0 <= args.clean_fraction < 1:
        raise BenchInputError(f"--clean-fraction={args.clean_fraction} must be in [0, 1)")
    needing = [m for m in args.methods if m in NEEDS_CLEAN]
    if args.clean_fraction == 0 and needing:
        raise BenchInputError(f"--clean-fraction=0 leaves no clean set for {', '.join(needing)} (they need one)")
    if args.noise_std <= 0:
        raise BenchInputError(f"--noise-std={args.noise_std} must be positive")
    if args.redenoise < 1 or args.pool_period < 1:
        raise BenchInputError(f"--redenoise={args.redenoise} and --pool-period={args.pool_period} must be >= 1")
    if args.refresh_every > args.pool_period:
        raise BenchInputError(f"--refresh-every={args.refresh_every} is longer than --pool-period="
                              f"{args.pool_period}: the pool could not be refreshed whole in one period")
    if args.patience < 1 or args.select_every < 1:
        raise BenchInputError(f"--patience={args.patience} and --select-every={args.select_every} must be >= 1")
    if args.warmup_budget < args.select_every * (args.patience + 1):
        raise BenchInputError(f"--warmup-budget={args.warmup_budget} steps hold fewer than --patience + 1 = "
                              f"{args.patience + 1} validation points at --select-every={args.select_every}")


@dataclass(frozen=True)
class PoolRefresh:
    """SFBD flow's refresh: ``size`` copies per worker every ``every`` steps, the whole slice every ``period``."""

    every: int
    size: int
    period: int
    steps: int  # SFBD flow's steps: ``redenoise`` whole-pool periods

    @property
    def redenoised(self) -> float:
        return self.steps / self.period


def pool_refresh(pool_slice: int, refresh_every: int, pool_period: int, redenoise: int,
                 refresh_size: int | None = None) -> PoolRefresh:
    """Refresh settings that re-denoise each of a worker's ``pool_slice`` copies ``redenoise`` times: a chunk of
    ``ceil(pool_slice * refresh_every / pool_period)`` every ``refresh_every`` steps (or ``refresh_size``, which
    must fit in the pool), for ``redenoise * pool_period`` steps."""
    if pool_slice < 1:
        raise BenchInputError("the noisy pool is empty: nothing to denoise")
    size = refresh_size if refresh_size is not None else math.ceil(pool_slice * refresh_every / pool_period)
    if size > pool_slice:
        raise BenchInputError(f"a pool refresh of {size} copies is larger than the pool ({pool_slice} per worker)")
    period = refresh_every * math.ceil(pool_slice / size)  # steps until every copy was refreshed once
    return PoolRefresh(every=refresh_every, size=size, period=period, steps=redenoise * period)


def plateau_step(curve: list[tuple[int, float]], patience: int, tol: float, budget: int) -> int:
    """The step of the best validation point once ``patience`` later points in a row failed to improve on it by
    more than ``tol`` (relative): the warm-up's plateau. None within the curve: :class:`BenchInputError`."""
    best_step, best, since = None, math.inf, 0
    for step, value in curve:
        if value < best * (1 - tol):
            best_step, best, since = step, value, 0
        else:
            since += 1
            if since >= patience:
                assert best_step is not None
                return best_step
    last = ", ".join(f"{v:.1f}" for _, v in curve[-(patience + 1):])
    raise BenchInputError(f"the warm-up reached no validation plateau within --warmup-budget={budget} steps "
                          f"(fd still falling: {last}); raise --warmup-budget")


def best_point(curve: list[tuple[int, float]]) -> tuple[int, float]:
    """Early stopping: the validation curve's lowest point (the first, on ties)."""
    return min(curve, key=lambda c: (c[1], c[0]))


def forward_flops(model: Any, channels: int, size: int, num_classes: int) -> float:
    """FLOPs of one sample's forward pass (batch of one, class-conditional, a mid-trajectory time)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, channels, size, size)
    t = torch.full((1,), 0.5)
    y = torch.zeros(1, dtype=torch.long) if num_classes else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y=y) if y is not None else model(x, t)
    return float(counter.get_total_flops())


def run_flops(f_forward: float, sample_gradients: float, denoise_sample_nfe: float) -> float:
    """``3 F G + F D``."""
    return f_forward * (3.0 * sample_gradients + denoise_sample_nfe)


def steps_for_flops(flops: float, f_forward: float, samples_per_step: int) -> int:
    """Steps of one batch of ``samples_per_step`` (all workers) that spend ``flops``."""
    return max(1, int(round(flops / (3.0 * f_forward * samples_per_step))))
