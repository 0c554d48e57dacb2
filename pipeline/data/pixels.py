"""Pixels as they travel and as the model sees them.

Shards store pixels as uint8 HWC. The training stream keeps them uint8 (as (B, C, H, W)) through Ray's object store
— a quarter of the bytes of float32 — and each training worker converts its batch after taking it:
``x = u8 / 127.5 - 1`` in [-1, 1], resized bilinearly (antialiased, clamped to [-1, 1]) when the model's size
differs from the stored one. Every reader that hands out floats uses the same :func:`to_model_pixels`, so both
paths give identical tensors.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def hwc_to_chw(stacked: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, C) -> contiguous uint8 (B, C, H, W)."""
    return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2))


def to_model_pixels(chw_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1], resized to ``size`` x ``size`` if needed."""
    import torch.nn.functional as F

    x = chw_u8.float().div_(127.5).sub_(1.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(-1.0, 1.0)
    return x


def model_batch(batch: dict[str, Any], info: Any) -> dict[str, Any]:
    """A streamed training batch with its uint8 pixels converted for the model (other columns untouched)."""
    image = batch.get("image")
    if info.kind == "pixels" and isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        batch = dict(batch)
        batch["image"] = to_model_pixels(image, info.size)
    return batch
