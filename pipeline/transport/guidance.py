"""Classifier-free guidance: ``p = p_u + w (p_c - p_u)`` for t in [t_min, t_max], the conditional ``p_c`` outside.

Velocity, score and noise predictions are affine in one another with the same x- and t-dependent coefficients, so
guiding the raw model output equals guiding the velocity (REFERENCE.md section 3). All output channels are guided
(not DiT's legacy first 3 of 4).
"""
from __future__ import annotations

import torch

from pipeline.transport.core import ModelFn


def guided(model_fn: ModelFn, null_label: int, scale: float, t_min: float = 0.0, t_max: float = 1.0) -> ModelFn:
    """Wrap a class-conditional ``model_fn(x, t, y=labels)``: cond and uncond (``y = null_label``) in one call."""
    if scale < 0:
        raise ValueError(f"guidance.scale={scale} must be >= 0")
    if t_min > t_max:
        raise ValueError(f"guidance.t_min={t_min} must be <= guidance.t_max={t_max}")

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        inside = (t >= t_min) & (t <= t_max)
        if scale == 1.0 or not bool(inside.any()):
            return model_fn(x, t, y=y, **kw)
        null = torch.full_like(y, null_label)
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **kw)
        cond, uncond = out.chunk(2)
        mix = uncond + scale * (cond - uncond)
        return torch.where(inside.reshape(-1, *([1] * (x.dim() - 1))), mix, cond)

    return fn
