"""Map a release noise level ``s`` to the interpolant time ``t*`` it corresponds to.

A noisy copy ``y = x + s eps`` scaled by ``alpha(t*)`` is ``alpha(t*) x + alpha(t*) s eps``, which has the law of
``x_t = alpha(t) x + sigma(t) eps`` exactly when ``sigma(t*) / alpha(t*) = s`` (REFERENCE.md 7). The ratio
``sigma/alpha`` falls strictly from its value at t = 0 (infinite for Linear/GVP) to 0 at t = 1, so ``t*`` is the
unique root of ``log sigma(t) - log alpha(t) - log s``; Linear has the closed form ``t* = 1 / (1 + s)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from scipy.optimize import brentq

Schedule = Callable[[float], float]


def _as_float_fn(fn: Callable[[Any], Any]) -> Schedule:
    def f(t: float) -> float:
        try:
            return float(fn(t))
        except TypeError:  # paths written for tensors only
            import torch

            return float(fn(torch.tensor(t, dtype=torch.float64)))
    return f


def time_for_noise_level(path: Any, s: float, tol: float = 1e-12) -> float:
    """The time ``t*`` in (0, 1) with ``sigma(t*) / alpha(t*) = s`` for a path with ``alpha(t)``/``sigma(t)``.

    ``path`` is any object with ``alpha`` and ``sigma`` callables (a ``pipeline.transport`` path) or a
    ``(alpha, sigma)`` pair of callables. Raises ``ValueError`` when ``s`` is not reachable on this path.
    """
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"noise level s={s} must be a positive finite number")
    alpha_fn, sigma_fn = path if isinstance(path, tuple) else (path.alpha, path.sigma)
    alpha, sigma = _as_float_fn(alpha_fn), _as_float_fn(sigma_fn)
    log_s = math.log(s)

    def g(t: float) -> float:
        return math.log(sigma(t)) - math.log(alpha(t)) - log_s

    lo, hi = 1e-9, 1.0 - 1e-9
    a_lo = alpha(lo)
    if a_lo > 0 and g(lo) < 0:
        raise ValueError(f"noise level s={s} exceeds what this path reaches (sigma/alpha at t=0 is {sigma(lo) / a_lo:.4g})")
    if g(hi) > 0:
        raise ValueError(f"noise level s={s} is too small to resolve on this path")
    return float(brentq(g, lo, hi, xtol=tol, maxiter=500))


def linear_time_for_noise_level(s: float) -> float:
    """Closed form for the Linear path (alpha = t, sigma = 1 - t): ``t* = 1 / (1 + s)``."""
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"noise level s={s} must be a positive finite number")
    return 1.0 / (1.0 + s)
