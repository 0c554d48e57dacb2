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


@lru_cache(maxsize=4)
def _real_pixel_stats(shards: str, image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    from evals.reference import load_real

    images, _ = load_real(shards, image_size)
    feats = images.flatten(1).double().numpy()
    return feats.mean(0), np.cov(feats, rowvar=False)


def fd_pixels(trained: Any, num_samples: int, seed: int) -> tuple[float, int]:
    """Pixel-space Fréchet distance of ``num_samples`` class-balanced samples to the validation shards; and NFE.

    For a latent shard set both sides are images decoded by the set's autoencoder (``sample_classes`` decodes the
    samples, ``load_real`` the validation latents), so the distance is taken between like and like.
    """
    from evals.frechet import frechet_distance
    from pipeline.sampling import sample_classes

    data = trained.config.data
    shards = data.val_shards or data.shards
    mu_r, sigma_r = _real_pixel_stats(str(shards), data.image_size)
    labels = torch.arange(num_samples) % max(trained.num_classes, 1)
    out = sample_classes(trained, labels, seed)
    feats = out.x.detach().float().cpu().clamp(-1, 1).flatten(1).double().numpy()
    return frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_r, sigma_r), int(out.nfe)


def evaluate(trained: Any, metrics: list[str], num_samples: int, seed: int) -> dict[str, float]:
    """The requested metrics of ``trained`` (its objective carries the sampler settings) plus ``nfe``."""
    out: dict[str, float] = {}
    if "fd_pixels" in metrics:
        out["fd_pixels"], out["nfe"] = fd_pixels(trained, num_samples, seed)
    others = [m for m in metrics if m not in OWN_METRICS]
    if others:
        try:
            from evals.evaluate import evaluate_checkpoint
        except ImportError as exc:
            raise FlowrailError(f"eval.metrics {others} need evals.evaluate ({exc})") from None
        cfg = trained.config.model_copy(deep=True)
        cfg.eval.metrics = others
        cfg.eval.num_samples = num_samples
        result = evaluate_checkpoint(trained, cfg)
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
