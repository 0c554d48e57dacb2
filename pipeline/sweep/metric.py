"""Scoring a checkpoint (with given sampler settings) for the sweep.

``fd_pixels`` is the Fréchet distance between Gaussians fitted to flattened pixels of generated and validation
images, ``||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^{1/2})``: cheap enough to run at every checkpoint of every
trial, which is what ASHA needs. Any other metric name (``fd_digits``, ``precision``, ``recall``,
``classifier_accuracy``, ``fid``) is computed by ``evals.evaluate.evaluate_checkpoint``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from pipeline.errors import FlowrailError

OWN_METRICS = ("fd_pixels",)
# fd_pixels fits a full covariance over every pixel value: d dimensions cost d^2 doubles (4,096: 134 MB) and an
# O(d^3) matrix square root, and need far more than d samples to mean anything; above this it is refused
FD_PIXELS_MAX_DIM = 4096
VAE_FACTOR = 8  # latent sets decode to RGB images this many times larger per side (SD-style autoencoders)


def fd_pixels_dim(kind: str, channels: int, size: int) -> int:
    """Dimensions of the flattened images fd_pixels compares (latent sets: their decoded RGB images)."""
    return 3 * (VAE_FACTOR * size) ** 2 if kind == "latents" else channels * size * size


def check_fd_pixels(kind: str, channels: int, size: int) -> None:
    """Refuse, in one line, ``fd_pixels`` on images with more than :data:`FD_PIXELS_MAX_DIM` values."""
    dim = fd_pixels_dim(kind, channels, size)
    if dim > FD_PIXELS_MAX_DIM:
        side = VAE_FACTOR * size if kind == "latents" else size
        raise FlowrailError(
            f"metric fd_pixels on {3 if kind == 'latents' else channels}x{side}x{side} images has {dim:,} dimensions "
            f"(a {8 * dim * dim / 1e9:,.0f} GB covariance), above its cap of {FD_PIXELS_MAX_DIM:,}: use fd_digits "
            "(digits) or fid (eval.inception_weights) instead")


def check_fd_pixels_shards(shards: str, image_size: int | None) -> None:
    """:func:`check_fd_pixels` for a shard set (its manifest's shape), before any work starts."""
    from pipeline.data.streaming import describe

    _, info = describe(shards, image_size, job="evaluation")
    check_fd_pixels(info.kind, info.channels, info.size)


def reference_half(images: torch.Tensor, split: str | None) -> torch.Tensor:
    """:func:`evals.reference.reference_half`, with an unknown split refused in one line."""
    from evals.reference import reference_half as half

    try:
        return half(images, split)
    except ValueError as exc:
        raise FlowrailError(str(exc)) from None


@lru_cache(maxsize=4)
def _real_pixel_stats(shards: str, image_size: int | None, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    from evals.reference import load_real

    images, _ = load_real(shards, image_size)
    feats = reference_half(images, split).flatten(1).double().numpy()
    return feats.mean(0), np.cov(feats, rowvar=False)


def fd_pixels(trained: Any, num_samples: int, seed: int, split: str | None = None) -> tuple[float, int]:
    """Pixel-space Fréchet distance of ``num_samples`` class-balanced samples to the validation shards; and NFE.

    For a latent shard set both sides are images decoded by the set's autoencoder (``sample_classes`` decodes the
    samples, ``load_real`` the validation latents), so the distance is taken between like and like.
    """
    from evals.frechet import frechet_distance
    from pipeline.sampling import sample_classes

    data = trained.config.data
    check_fd_pixels(trained.data.kind, trained.data.channels, trained.data.size)
    shards = data.val_shards or data.shards
    mu_r, sigma_r = _real_pixel_stats(str(shards), data.image_size, split)
    labels = torch.arange(num_samples) % max(trained.num_classes, 1)
    out = sample_classes(trained, labels, seed)
    feats = out.x.detach().float().cpu().clamp(-1, 1).flatten(1).double().numpy()
    return frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_r, sigma_r), int(out.nfe)


def evaluate(trained: Any, metrics: list[str], num_samples: int, seed: int,
             split: str | None = None) -> dict[str, float]:
    """The requested metrics of ``trained`` (its objective carries the sampler settings) plus ``nfe``; ``split``:
    which half of the reference set ``fd_pixels`` and the digits metrics compare with (:func:`reference_half`)."""
    out: dict[str, float] = {}
    if "fd_pixels" in metrics:
        out["fd_pixels"], out["nfe"] = fd_pixels(trained, num_samples, seed, split)
    others = [m for m in metrics if m not in OWN_METRICS]
    if others:
        try:
            from evals.evaluate import evaluate_checkpoint
        except ImportError as exc:
            raise FlowrailError(f"eval.metrics {others} need evals.evaluate ({exc})") from None
        cfg = trained.config.model_copy(deep=True)
        cfg.eval.metrics = others
        cfg.eval.num_samples = num_samples
        result = evaluate_checkpoint(trained, cfg, reference_split=split)
        out.update({k: float(v) for k, v in result.items() if isinstance(v, (int, float))})
    missing = [m for m in metrics if m not in out]
    if missing:
        raise FlowrailError(f"evaluation did not produce metrics {missing}")
    return out


def with_sampler(trained: Any, sampler: Any, guidance: Any) -> Any:
    """A copy of ``trained`` sampling with other sampler/guidance settings (same weights, no retraining)."""
    from dataclasses import replace

    from pipeline.objective import build_objective

    cfg = trained.config.model_copy(update={"sampler": sampler, "guidance": guidance}, deep=True)
    objective = build_objective(cfg, trained.num_classes)
    if hasattr(trained.objective, "captions"):  # a FLUX caption view: keep its prompts, swap the inner objective
        objective = replace(trained.objective, objective=objective)
    return replace(trained, config=cfg, objective=objective)
