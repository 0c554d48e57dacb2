"""Conversions between what a network predicts: velocity, score or noise (REFERENCE.md section 2).

With ``x = alpha x1 + sigma x0`` (x0 ~ N(0, I)) and the model's conditional expectations
``x0_hat = E[x0 | x]`` and ``x1_hat = E[x1 | x]``:

- noise    ``eps   = x0_hat``
- score    ``s     = -x0_hat / sigma``                      (score of the marginal p_t)
- velocity ``v     = alpha' x1_hat + sigma' x0_hat = (alpha'/alpha) x + drift_var * s``,
  with ``drift_var = alpha'/alpha sigma^2 - sigma sigma'``.

The inverse ``s = (alpha v - alpha' x) / (sigma (alpha' sigma - alpha sigma'))`` is finite at t = 0
even when alpha(0) = 0. Noise/score -> velocity divides by alpha, so it needs t > 0 (``sample_eps``).
"""
from __future__ import annotations

from typing import Literal

import torch

from pipeline.transport.paths import Path

Prediction = Literal["velocity", "score", "noise"]
PREDICTIONS = ("velocity", "score", "noise")


def expand_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a time of shape [] or [B] against ``x`` of shape [B, ...] (to x's dtype)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _coeffs(path: Path, t: torch.Tensor, x: torch.Tensor):
    tt = expand_t(t, x)
    return path.alpha(tt), path.sigma(tt), path.d_alpha(tt), path.d_sigma(tt)


def to_velocity(pred: torch.Tensor, kind: Prediction, path: Path, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Velocity ``E[u_t | x_t = x]`` from a ``kind`` prediction."""
    if kind == "velocity":
        return pred
    a, s, da, ds = _coeffs(path, t, x)
    eps = pred if kind == "noise" else -s * pred if kind == "score" else _bad(kind)
    # v = alpha' x1_hat + sigma' eps with x1_hat = (x - sigma eps) / alpha
    return (da * x + (a * ds - da * s) * eps) / a


def to_score(pred: torch.Tensor, kind: Prediction, path: Path, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Score ``grad log p_t(x)`` from a ``kind`` prediction."""
    if kind == "score":
        return pred
    a, s, da, ds = _coeffs(path, t, x)
    if kind == "noise":
        return -pred / s
    if kind == "velocity":
        return (a * pred - da * x) / (s * (da * s - a * ds))
    return _bad(kind)


def to_noise(pred: torch.Tensor, kind: Prediction, path: Path, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise ``E[x0 | x_t = x]`` from a ``kind`` prediction."""
    if kind == "noise":
        return pred
    a, s, da, ds = _coeffs(path, t, x)
    if kind == "score":
        return -s * pred
    if kind == "velocity":
        return (da * x - a * pred) / (da * s - a * ds)
    return _bad(kind)


def to_data(pred: torch.Tensor, kind: Prediction, path: Path, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Denoised estimate ``E[x1 | x_t = x] = (x - sigma eps) / alpha`` (Tweedie)."""
    a, s, da, ds = _coeffs(path, t, x)
    if kind == "velocity":  # x1_hat = (sigma v - sigma' x) / (alpha' sigma - alpha sigma'), finite where alpha = 0
        return (s * pred - ds * x) / (da * s - a * ds)
    return (x - s * to_noise(pred, kind, path, x, t)) / a


def convert(pred: torch.Tensor, src: Prediction, dst: Prediction, path: Path, x: torch.Tensor,
            t: torch.Tensor) -> torch.Tensor:
    """Convert a ``src`` prediction into a ``dst`` one (``dst`` may also be ``"data"``)."""
    fn = {"velocity": to_velocity, "score": to_score, "noise": to_noise, "data": to_data}.get(dst)
    if fn is None:
        _bad(dst)
    return fn(pred, src, path, x, t)


def _bad(kind: str):
    raise ValueError(f"transport.prediction={kind!r} is unknown (allowed: {', '.join(PREDICTIONS)})")
