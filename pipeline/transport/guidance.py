"""Classifier-free guidance: ``p = p_u + w (p_c - p_u)`` for t in [t_min, t_max], the conditional ``p_c`` outside.

Velocity, score and noise predictions are affine in one another with the same x- and t-dependent coefficients, so
guiding the raw model output equals guiding the velocity (REFERENCE.md section 3). All output channels are guided
by default; ``channels=3`` reproduces SiT/DiT's legacy sampling, which guides only the first 3 of the 4 latent
channels (the remaining channels keep the conditional prediction).
"""
from __future__ import annotations

import torch

from pipeline.transport.core import ModelFn


def guided(model_fn: ModelFn, null_label: int, scale: float, t_min: float = 0.0, t_max: float = 1.0,
           channels: int | None = None) -> ModelFn:
    """Wrap a class-conditional ``model_fn(x, t, y=labels)``: cond and uncond (``y = null_label``) in one call.

    ``channels``: guide only output channels ``[:channels]`` (the rest stay conditional); None guides all.
    """
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
        if channels is not None and channels < out.shape[1]:
            mix = torch.cat([mix[:, :channels], cond[:, channels:]], dim=1)
        return torch.where(inside.reshape(-1, *([1] * (x.dim() - 1))), mix, cond)

    return fn
