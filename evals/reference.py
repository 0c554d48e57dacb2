"""Real images from a shard set, decoded exactly as training sees them, and cached reference statistics.

Reference statistics (mean and covariance of features of real images) are computed once per shard set, feature
space, image size and sample limit, and cached as an npz with ``mu`` and ``sigma`` (the ADM format).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from evals.frechet import RunningStats, load_stats

FeatureFn = Callable[[torch.Tensor], torch.Tensor]

SPLITS = ("select", "gate")


def reference_half(images: torch.Tensor, split: str | None) -> torch.Tensor:
    """The reference images a score is taken against: all (``None``), the even-indexed half (``select``: what a
    sweep selects on) or the odd-indexed half (``gate``: held out for the promotion gate, never used to select)."""
    if split is None:
        return images
    if split not in SPLITS:
        raise ValueError(f"reference split {split!r} is unknown (allowed: {', '.join(SPLITS)})")
    return images[0::2] if split == "select" else images[1::2]


def default_cache_dir() -> Path:
    """``$FLOWRAIL_CACHE`` or ``~/.cache/flowrail``."""
    return Path(os.environ.get("FLOWRAIL_CACHE") or Path.home() / ".cache" / "flowrail")


def iter_real_batches(shards: str | Path, image_size: int | None, batch_size: int = 256,
                      max_samples: int | None = None, job: str = "evaluate") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images (B, C, H, W) in [-1, 1], labels (B,))`` from a local shard set, with the training decode/resize.

    A latent shard set is decoded through its own autoencoder (the manifest's ``vae``), so real and generated
    images (which ``sample_classes`` decodes the same way) are compared in pixel space.
    """
    from pipeline.data.shards import iter_samples
    from pipeline.data.streaming import Decode, describe

    _, info = describe(str(shards), image_size, job=job)
    decode = Decode(info, policy="fail")
    taken = 0

    def emit(arrays: list, labels: list, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
        out = decode({info.field: arrays, "cls": np.asarray(labels), "__key__": np.asarray(keys)})
        x = torch.from_numpy(np.ascontiguousarray(out["image"]))
        if info.kind == "latents":
            from pipeline.data.encode import decode_latents_from_info

            with torch.no_grad():
                x = decode_latents_from_info(x.float(), info)
        return x, torch.from_numpy(out["label"])

    arrays, labels, keys = [], [], []
    for key, sample in iter_samples(shards):
        if max_samples is not None and taken >= max_samples:
            break
        arrays.append(sample.get(info.field))
        labels.append(sample.get("cls", -1))
        keys.append(key)
        taken += 1
        if len(arrays) == batch_size:
            yield emit(arrays, labels, keys)
            arrays, labels, keys = [], [], []
    if arrays:
        yield emit(arrays, labels, keys)


def load_real(shards: str | Path, image_size: int | None, max_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or the first ``max_samples``) real images and labels of a small shard set."""
    batches = list(iter_real_batches(shards, image_size, max_samples=max_samples))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _cache_key(shards: str | Path, feature_name: str, image_size: int | None, max_samples: int | None) -> str:
    from pipeline.data.shards import read_manifest

    manifest = read_manifest(shards)
    identity = {"shards": [(s.get("name"), s.get("sha256"), s.get("num_samples")) for s in manifest["shards"]],
                "features": feature_name, "image_size": image_size, "max_samples": max_samples}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def reference_stats(shards: str | Path, features: FeatureFn, *, feature_name: str, dim: int,
                    image_size: int | None, cache_dir: str | Path | None = None, max_samples: int | None = None,
                    batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of ``features`` over the real images of ``shards``, cached as ``<feature_name>-<hash>.npz``.

    The hash covers the shards' sha256s, the feature space name, the image size and the sample limit, so a changed
    shard set or resolution never reuses stale statistics.
    """
    cache = Path(cache_dir or default_cache_dir()) / "reference" / (
        f"{feature_name}-{_cache_key(shards, feature_name, image_size, max_samples)}.npz")
    if cache.is_file():
        return load_stats(cache)
    stats = RunningStats(dim)
    with torch.no_grad():
        for images, _ in iter_real_batches(shards, image_size, batch_size, max_samples):
            stats.update(features(images))
    stats.save(cache)
    return stats.mean, stats.cov
