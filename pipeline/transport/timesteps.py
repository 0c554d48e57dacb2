"""Training-time samplers for t and time-grid shifts (REFERENCE.md section 4; t = 0 noise, t = 1 data).

- uniform ``t ~ U(0, 1)``
- logit-normal ``t = sigmoid(N(m, s))``
- SD3 "mode" ``t = 1 - f(u)``, ``f(u) = 1 - u - c (cos^2(pi u / 2) - 1 + u)``, u ~ U(0, 1) (its law is symmetric about 1/2)
- FLUX resolution shift: ``mu`` linear in the image token count through (256, 0.5) and (4096, 1.15); a noise level
  ``s = 1 - t`` becomes ``e^mu / (e^mu + (1/s - 1))``, which is :func:`shift_time` with ``shift = e^mu``.
"""
from __future__ import annotations

import math

import torch

from pipeline.config import TransportConfig


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """FLUX/SD3 time shift in our convention: noise level ``s = 1 - t`` -> ``shift s / (1 + (shift - 1) s)``.

    Returns ``t / (t + shift (1 - t))``; shift > 1 spends more of [0, 1] near noise, shift = 1 is the identity.
    """
    if not shift > 0:
        raise ValueError(f"time shift={shift} must be > 0")
    return t / (t + shift * (1 - t))


def flux_mu(num_tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent ``mu``: linear in the token count through (256, 0.5) and (4096, 1.15)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (num_tokens - base_tokens)


def resolution_shift(t: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Apply the FLUX resolution shift (``shift = exp(mu(num_tokens))``) to times ``t``."""
    return shift_time(t, math.exp(flux_mu(num_tokens)))


def sample_uniform(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=_gen_device(generator, device)).to(device)


def sample_logit_normal(n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None,
                        device=None) -> torch.Tensor:
    z = torch.randn(n, generator=generator, device=_gen_device(generator, device)).to(device)
    return torch.sigmoid(mean + std * z)


def sample_mode(n: int, scale: float = 1.29, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=_gen_device(generator, device)).to(device)
    f = 1 - u - scale * (torch.cos(0.5 * math.pi * u) ** 2 - 1 + u)
    return (1 - f).clamp(0, 1)


def sample_train_times(cfg: TransportConfig, n: int, eps: float, num_tokens: int | None = None,
                       generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Training times from ``cfg.time_sampler`` (optionally FLUX-shifted), mapped affinely into [eps, 1 - eps]."""
    if cfg.time_sampler in ("auto", "uniform"):  # auto: a family's own default; uniform here
        t = sample_uniform(n, generator, device)
    elif cfg.time_sampler == "logit_normal":
        t = sample_logit_normal(n, cfg.logit_mean, cfg.logit_std, generator, device)
    elif cfg.time_sampler == "mode":
        t = sample_mode(n, cfg.mode_scale, generator, device)
    else:
        raise ValueError(f"transport.time_sampler={cfg.time_sampler!r} is unknown (allowed: uniform, logit_normal, mode)")
    if cfg.resolution_shift:
        if num_tokens is None:
            raise ValueError("transport.resolution_shift=true needs the image token count")
        t = resolution_shift(t, num_tokens)
    return eps + (1 - 2 * eps) * t


def resolve_time_shift(time_shift: float | str | None, num_tokens: int, default: float | str = 1.0) -> float:
    """The numeric grid shift of ``sampler.time_shift``: a number is itself, ``"auto"`` the FLUX resolution shift
    ``exp(mu(num_tokens))``, ``None`` the family's ``default`` (itself a number or ``"auto"``)."""
    value = default if time_shift is None else time_shift
    if value == "auto":
        return math.exp(flux_mu(num_tokens))
    value = float(value)
    if not value > 0:
        raise ValueError(f"sampler.time_shift={value} must be > 0")
    return value


def image_tokens(spatial: tuple[int, ...] | torch.Size, patch_size: int) -> int:
    """Tokens per sample of a patch-``patch_size`` transformer on a sample of spatial size ``spatial``."""
    n = 1
    for size in spatial:
        n *= int(size)
    return max(1, n // (patch_size ** len(spatial)))


def time_grid(t0: float, t1: float, steps: int, shift: float = 1.0, dtype=torch.float64, device=None) -> torch.Tensor:
    """``steps + 1`` times from t0 to t1: a uniform grid, optionally shifted by :func:`shift_time`."""
    if steps < 1:
        raise ValueError(f"sampler.steps={steps} must be >= 1")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=dtype, device=device)
    if shift != 1.0:
        u = shift_time(u, shift)
    return t0 + (t1 - t0) * u


def _gen_device(generator: torch.Generator | None, device):
    return generator.device if generator is not None else device
