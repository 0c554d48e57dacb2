"""FLUX latent layout: 2x2 packing into 64-channel tokens, RoPE position ids, autoencoder shift/scale.

- pack: ``(B, C, H, W) -> (B, (H/2)(W/2), 4C)``; token ``(i, j)`` holds the 2x2 patch at rows ``2i..2i+1``,
  columns ``2j..2j+1``, channel-major (``c * 4 + 2 * di + dj``), as FLUX and diffusers lay it out (other patch
  sizes ``p`` likewise; FLUX-DFM packs its coarse stage with ``p = 1``).
- image ids: per token ``(0, i, j)``; text ids: all zeros ``(L, 3)``.
- autoencoder normalisation: ``latent = (z - shift_factor) * scaling_factor``; decode with the inverse.
"""
from __future__ import annotations

import torch


def pack_latents(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``(B, C, H, W) -> (B, H/p * W/p, p*p*C)`` (H and W divisible by ``p``; FLUX uses ``p = 2``)."""
    b, c, h, w = latents.shape
    if h % patch or w % patch:
        need = "even height and width" if patch == 2 else f"height and width divisible by {patch}"
        raise ValueError(f"FLUX latents need {need}, got {h}x{w}")
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, patch: int = 2) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``(B, H/p * W/p, p*p*C) -> (B, C, H, W)``."""
    b, n, d = tokens.shape
    if n != (height // patch) * (width // patch) or d % (patch * patch):
        raise ValueError(f"{n} tokens of width {d} do not unpack to a {height}x{width} latent")
    x = tokens.reshape(b, height // patch, width // patch, d // (patch * patch), patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // (patch * patch), height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(H/2 * W/2, 3)`` RoPE ids of the packed tokens: ``(0, row, col)``."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(L, 3)`` zeros: FLUX gives text tokens no spatial position."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def num_image_tokens(height: int, width: int) -> int:
    return (height // 2) * (width // 2)


def normalize_latents(z: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """Autoencoder latent -> model space: ``(z - shift) * scale``."""
    return (z - shift_factor) * scaling_factor


def denormalize_latents(latents: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """Model space -> autoencoder latent: ``latents / scale + shift``."""
    return latents / scaling_factor + shift_factor
