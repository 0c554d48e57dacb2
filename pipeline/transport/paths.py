"""Interpolant paths ``x_t = alpha(t) x1 + sigma(t) x0`` (t = 0 noise, t = 1 data; REFERENCE.md section 2).

Each path gives alpha, sigma and their time derivatives as elementwise functions of a tensor ``t``.
The conditional velocity target is ``u_t = alpha'(t) x1 + sigma'(t) x0``.
"""
from __future__ import annotations

import math

import torch

from pipeline.config import TransportConfig


class Path:
    """Base class: subclasses implement ``alpha``, ``sigma``, ``d_alpha``, ``d_sigma``."""

    name = "path"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def drift_var(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha'/alpha sigma^2 - sigma sigma'``: the score's coefficient in the velocity (and the SBDM diffusion).

        Written as ``sigma (alpha' sigma - alpha sigma') / alpha``; infinite where alpha = 0.
        """
        a, s, da, ds = self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)
        return s * (da * s - a * ds) / a

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearPath(Path):
    """alpha = t, sigma = 1 - t (rectified flow / SiT "Linear")."""

    name = "linear"

    def alpha(self, t):
        return t

    def sigma(self, t):
        return 1 - t

    def d_alpha(self, t):
        return torch.ones_like(t)

    def d_sigma(self, t):
        return -torch.ones_like(t)


class GVPPath(Path):
    """alpha = sin(pi t / 2), sigma = cos(pi t / 2): variance preserving, alpha^2 + sigma^2 = 1."""

    name = "gvp"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def d_sigma(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class VPPath(Path):
    """alpha = exp(m(t)), m(t) = -1/4 (1-t)^2 (b_max - b_min) - 1/2 (1-t) b_min; sigma = sqrt(1 - alpha^2).

    sigma'(t) = -alpha alpha' / sigma is infinite at t = 1: sample and train with an epsilon there.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if beta_max < beta_min:
            raise ValueError(f"transport.vp_beta_max={beta_max} must be >= transport.vp_beta_min={beta_min}")
        self.beta_min, self.beta_max = beta_min, beta_max

    def _m(self, t):
        u = 1 - t
        return -0.25 * u**2 * (self.beta_max - self.beta_min) - 0.5 * u * self.beta_min

    def _dm(self, t):
        return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

    def alpha(self, t):
        return torch.exp(self._m(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._m(t)))  # sqrt(1 - alpha^2) without cancellation near t = 1

    def d_alpha(self, t):
        return self.alpha(t) * self._dm(t)

    def d_sigma(self, t):
        a = self.alpha(t)
        return -a * a * self._dm(t) / self.sigma(t)

    def __repr__(self) -> str:
        return f"VPPath(beta_min={self.beta_min}, beta_max={self.beta_max})"


class PolynomialPath(Path):
    """alpha = t^n, sigma = 1 - t^n (the flow_matching library's polynomial convex schedule)."""

    name = "polynomial"

    def __init__(self, n: float = 2.0):
        if n <= 0:
            raise ValueError(f"transport.polynomial_n={n} must be > 0")
        self.n = float(n)

    def alpha(self, t):
        return t**self.n

    def sigma(self, t):
        return 1 - t**self.n

    def d_alpha(self, t):
        return self.n * t ** (self.n - 1)

    def d_sigma(self, t):
        return -self.n * t ** (self.n - 1)

    def __repr__(self) -> str:
        return f"PolynomialPath(n={self.n})"


class LinearVPPath(Path):
    """alpha = t, sigma = sqrt(1 - t^2); sigma' = -t / sigma is infinite at t = 1."""

    name = "linear_vp"

    def alpha(self, t):
        return t

    def sigma(self, t):
        return torch.sqrt(1 - t**2)

    def d_alpha(self, t):
        return torch.ones_like(t)

    def d_sigma(self, t):
        return -t / torch.sqrt(1 - t**2)


def build_path(cfg: TransportConfig) -> Path:
    """The path named by ``cfg.path``."""
    if cfg.path == "linear":
        return LinearPath()
    if cfg.path == "gvp":
        return GVPPath()
    if cfg.path == "vp":
        return VPPath(cfg.vp_beta_min, cfg.vp_beta_max)
    if cfg.path == "polynomial":
        return PolynomialPath(cfg.polynomial_n)
    if cfg.path == "linear_vp":
        return LinearVPPath()
    raise ValueError(f"transport.path={cfg.path!r} is unknown (allowed: linear, gvp, vp, polynomial, linear_vp)")


def time_for_noise_level(path: Path, s: float, tol: float = 1e-10) -> float:
    """The time t* with sigma(t*) / alpha(t*) = s (s > 0): ``alpha(t*) (x + s eps)`` has the law of ``x_t*``.

    Closed form 1 / (1 + s) on the Linear path; bisection otherwise (sigma/alpha decreases from +inf to 0).
    """
    if not s > 0 or not math.isfinite(s):
        raise ValueError(f"noise level s={s} must be a positive finite number")
    if isinstance(path, LinearPath):
        return 1.0 / (1.0 + s)
    zero = torch.tensor(0.0, dtype=torch.float64)
    if float(path.sigma(zero) / path.alpha(zero)) < s:  # e.g. VP: alpha(0) = exp(-5.025) > 0 caps sigma/alpha
        raise ValueError(f"noise level s={s} exceeds the largest sigma/alpha of path {path.name} "
                         f"({float(path.sigma(zero) / path.alpha(zero)):.4g} at t=0)")
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        t = torch.tensor(mid, dtype=torch.float64)
        ratio = float(path.sigma(t) / path.alpha(t))
        if ratio > s:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
