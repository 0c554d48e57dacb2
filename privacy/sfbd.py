"""SFBD and online SFBD (SFBD flow): train a flow model from noisy copies ``y = x + s eps`` and a small clean set.

Denoising (REFERENCE.md 7): ``alpha(t*) y`` has the law of ``x_t*`` when ``sigma(t*) / alpha(t*) = s``, so a
noisy copy is denoised by integrating the probability-flow ODE ``dx/dt = v(x, t)`` from ``t*`` (state
``alpha(t*) y``) to t = 1 with the current (EMA) model: deterministic Heun, 40 steps by default.

Methods, all one training loop with a different :class:`Schedule`:

- ``clean_only``: the clean set alone (baseline).
- ``noisy_only``: the noisy copies treated as data (naive baseline).
- ``sfbd``: clean pretraining for ``warmup_steps``; then K rounds, each starting by denoising the whole noisy set
  with the current EMA model and fine-tuning on clean ∪ denoised.
- ``sfbd_flow`` (online SFBD): clean warm-up; then a denoised pool, refreshed every ``refresh_every`` steps from the
  latest model (``refresh_size`` samples of each worker's slice per refresh, cycling), with the denoised weight
  ``w`` ramping linearly 0 -> 1 between ``ramp_start`` and ``ramp_end``.

The loss on clean ∪ denoised is the union's mean loss with the denoised half weighted by ``w``:
``(n_c L_clean + w n_d L_denoised) / (n_c + w n_d)`` (n_c, n_d: set sizes; one batch of each per step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

METHODS = ("clean_only", "noisy_only", "sfbd", "sfbd_flow")


def noise_time(transport: Any, s: float) -> float:
    """``t*`` with ``sigma(t*) / alpha(t*) = s`` on the transport's path."""
    from pipeline.transport.paths import time_for_noise_level

    return time_for_noise_level(transport.path, s)


@torch.no_grad()
def denoise(objective: Any, model: nn.Module, y: torch.Tensor, s: float, labels: torch.Tensor | None = None,
            steps: int = 40, solver: str = "heun", batch_size: int = 512) -> tuple[torch.Tensor, int]:
    """Denoise noisy copies ``y`` (pixel scale) by the reverse ODE from ``t*``; returns ``(x_hat, nfe)``."""
    from pipeline.transport.ode import ODESampler

    transport = getattr(objective, "transport", None)
    if transport is None:
        raise ValueError(f"SFBD denoising needs a transport objective (model.name=sit/SiT-*); got {type(objective).__name__}")
    t_star = noise_time(transport, s)
    alpha = float(transport.path.alpha(torch.tensor(t_star, dtype=torch.float64)))
    sampler = ODESampler(transport, solver=solver, steps=steps)
    param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    device = param.device if param is not None else y.device
    dtype = param.dtype if param is not None else y.dtype
    out, nfe = [], 0
    for i in range(0, y.shape[0], batch_size):
        x = (alpha * y[i:i + batch_size].double()).to(device=device, dtype=dtype)
        kw = {"y": labels[i:i + batch_size].to(device)} if labels is not None else {}
        res = sampler.sample(model, x, t_start=t_star, **kw)
        out.append(res.x.to(y.dtype))
        nfe = res.nfe
    return torch.cat(out), nfe


def ramp(step: int, start: int, end: int) -> float:
    """Linear 0 -> 1 between ``start`` and ``end`` (a step function at ``start`` when ``end <= start``)."""
    if step < start:
        return 0.0
    if end <= start or step >= end:
        return 1.0
    return (step - start) / (end - start)


@dataclass
class Schedule:
    """When to refresh the denoised pool, how much of it, and the denoised loss weight at each step."""

    method: str
    total_steps: int
    warmup_steps: int = 0
    rounds: int = 1
    refresh_every: int = 20
    ramp_start: int | None = None
    ramp_end: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"privacy.method={self.method!r} is unknown (allowed: {', '.join(METHODS)})")
        if self.method in ("sfbd", "sfbd_flow") and self.warmup_steps >= self.total_steps:
            raise ValueError(f"privacy.warmup_steps={self.warmup_steps} leaves no step of train.steps="
                             f"{self.total_steps} for the denoised data")

    @property
    def uses_clean(self) -> bool:
        return self.method != "noisy_only"

    @property
    def uses_pool(self) -> bool:
        return self.method != "clean_only"

    @property
    def denoises(self) -> bool:
        return self.method in ("sfbd", "sfbd_flow")

    def round_starts(self) -> list[int]:
        """SFBD: the steps at which a round begins (the whole pool is re-denoised there)."""
        span = self.total_steps - self.warmup_steps
        return [self.warmup_steps + (k * span) // self.rounds for k in range(self.rounds)]

    def refresh(self, step: int) -> str | None:
        """Before training step ``step`` (0-based): ``"full"``, ``"chunk"`` or ``None``."""
        if self.method == "sfbd":
            return "full" if step in self.round_starts() else None
        if self.method == "sfbd_flow":
            if step == self.warmup_steps:
                return "full"
            if step > self.warmup_steps and (step - self.warmup_steps) % self.refresh_every == 0:
                return "chunk"
        return None

    def weight(self, step: int) -> float:
        """The denoised (or noisy) data's loss weight ``w`` at ``step``."""
        if self.method == "clean_only":
            return 0.0
        if self.method == "noisy_only":
            return 1.0
        if step < self.warmup_steps:
            return 0.0
        if self.method == "sfbd":
            return 1.0
        start = self.warmup_steps if self.ramp_start is None else max(self.ramp_start, self.warmup_steps)
        end = start if self.ramp_end is None else self.ramp_end
        return ramp(step, start, end)


class DenoisedPool:
    """One worker's slice of the noisy set and its current reconstructions.

    ``valid`` marks entries that hold a reconstruction; only those are drawn. Chunks are refreshed cyclically, so
    every noisy copy is re-denoised once per ``len / refresh_size`` refreshes.
    """

    def __init__(self, noisy: torch.Tensor, labels: torch.Tensor, keep_noisy: bool = False) -> None:
        self.noisy, self.labels = noisy, labels
        self.data = noisy.clone() if keep_noisy else torch.zeros_like(noisy)
        self.valid = torch.full((noisy.shape[0],), keep_noisy, dtype=torch.bool)
        self.cursor = 0
        self.refreshes = 0
        self.last_change = 0.0

    def __len__(self) -> int:
        return self.noisy.shape[0]

    def next_indices(self, count: int | None) -> torch.Tensor:
        n = len(self)
        if count is None or count >= n:
            self.cursor = 0
            return torch.arange(n)
        idx = (self.cursor + torch.arange(count)) % n
        self.cursor = int((self.cursor + count) % n)
        return idx

    def update(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        old = self.data[idx]
        was = self.valid[idx]
        self.last_change = float((values - old)[was].abs().mean()) if bool(was.any()) else float("nan")
        self.data[idx] = values.to(self.data.dtype)
        self.valid[idx] = True
        self.refreshes += 1

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pool = torch.nonzero(self.valid).flatten()
        if pool.numel() == 0:
            raise RuntimeError("the denoised pool is empty: no refresh has run yet")
        pick = pool[torch.randint(pool.numel(), (batch_size,), generator=generator)]
        return {"image": self.data[pick], "label": self.labels[pick]}


def sample_clean(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch drawn with replacement from an in-memory clean slice."""
    pick = torch.randint(images.shape[0], (batch_size,), generator=generator)
    return {"image": images[pick], "label": labels[pick]}


def mixed_loss(loss_clean: torch.Tensor | None, loss_pool: torch.Tensor | None, n_clean: int, n_pool: int,
               w: float) -> torch.Tensor:
    """``(n_c L_c + w n_d L_d) / (n_c + w n_d)``; either term may be absent."""
    if loss_pool is None or w == 0.0 or n_pool == 0:
        assert loss_clean is not None
        return loss_clean
    if loss_clean is None or n_clean == 0:
        return loss_pool
    return (n_clean * loss_clean + w * n_pool * loss_pool) / (n_clean + w * n_pool)
