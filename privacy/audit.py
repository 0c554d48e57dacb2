"""Memorization audits: how close generated (or denoised) images get to the sensitive training images.

- Carlini et al. 2023 extraction: ``x_hat`` extracts training image ``x`` (its nearest neighbour) when
  ``l2(x_hat, x) / (alpha * mean_{y in S} l2(x_hat, y)) <= 1`` with ``alpha = 0.5`` and ``S`` the ``n = 50`` nearest
  training images; ``l2(a, b) = ||a - b|| / sqrt(d)`` on pixels in [0, 1].
- Nearest-neighbour distance statistics under the same l2.
- Somepalli et al. 2023: per image, the maximum cosine similarity to any training image in a feature space;
  mean, 95th percentile, fraction above 0.5, and the same statistic of each training image against its nearest
  *other* training image as the reference.
- For a denoised pool with known originals: the distance of each reconstruction to its own original and how often
  the original is its nearest training image (re-identification rate).
- The floors every model's figure is read against: the real-vs-real nearest-neighbour distance (each image to its
  nearest *other* training image) and the noisy release's own re-identification / extraction rates.
- ``upper_bound``: the one-sided 95% Clopper-Pearson bound of a rate seen as k of n; 0 of n bounds it by
  ``1 - 0.05^(1/n)``, below 1% from n = 299 samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

CHUNK = 1024


def unit_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any shape ``(N, ...)``) -> flat float64 rows in [0, 1]."""
    return ((x.reshape(x.shape[0], -1).double() + 1.0) / 2.0).clamp(0.0, 1.0)


def normalized_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All pairwise ``||a_i - b_j|| / sqrt(d)`` for flat rows ``a (N, d)``, ``b (M, d)``: an (N, M) matrix."""
    d = a.shape[1]
    rows = [torch.cdist(a[i:i + CHUNK], b, compute_mode="donot_use_mm_for_euclid_dist")
            for i in range(0, a.shape[0], CHUNK)]
    return torch.cat(rows) / d ** 0.5


@dataclass
class Extraction:
    ratio: torch.Tensor  # (N,) Carlini ratio per generated image
    nearest: torch.Tensor  # (N,) index of the nearest training image
    nn_distance: torch.Tensor  # (N,) normalised l2 to it
    alpha: float
    n: int

    @property
    def extracted(self) -> torch.Tensor:
        return self.ratio <= 1.0

    @property
    def fraction(self) -> float:
        return float(self.extracted.double().mean())


def carlini_extraction(generated: torch.Tensor, train: torch.Tensor, alpha: float = 0.5, n: int = 50) -> Extraction:
    """Carlini et al. criterion for images in [-1, 1]; ``n`` is capped at the training-set size."""
    if generated.shape[1:] != train.shape[1:]:
        raise ValueError(f"generated images {tuple(generated.shape[1:])} and training images "
                         f"{tuple(train.shape[1:])} differ in shape")
    dist = normalized_l2(unit_pixels(generated), unit_pixels(train))
    k = min(n, train.shape[0])
    near, idx = dist.topk(k, dim=1, largest=False)
    ratio = near[:, 0] / (alpha * near.mean(dim=1)).clamp_min(1e-12)
    return Extraction(ratio=ratio, nearest=idx[:, 0], nn_distance=near[:, 0], alpha=alpha, n=k)


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a binomial rate observed as ``k`` successes in ``n`` trials."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    if k == 0:
        return 1.0 - (1.0 - confidence) ** (1.0 / n)
    from scipy.stats import beta

    return float(beta.ppf(confidence, k + 1, n - k))


def samples_for_zero_bound(rate: float, confidence: float = 0.95) -> int:
    """The fewest samples for which 0 of n bounds the rate below ``rate``."""
    import math

    return math.floor(math.log(1.0 - confidence) / math.log(1.0 - rate)) + 1


RATIO_BINS = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, float("inf"))


def ratio_histogram(ratio: torch.Tensor, prefix: str) -> dict[str, float]:
    """Fraction of Carlini ratios in each bin of :data:`RATIO_BINS` (the distribution, not only ``ratio <= 1``)."""
    out = {}
    for lo, hi in zip(RATIO_BINS[:-1], RATIO_BINS[1:]):
        name = f"{prefix}_frac_{lo:g}_{hi:g}".replace("inf", "up")
        out[name] = float(((ratio > lo) & (ratio <= hi)).double().mean()) if lo > 0 else \
            float((ratio <= hi).double().mean())
    return out


def nn_floor(released: torch.Tensor, train: torch.Tensor, released_index: torch.Tensor,
             prefix: str = "floor_nn_l2") -> dict[str, float]:
    """Real-vs-real floor: each released image's normalised l2 to its nearest *other* training image
    (``released_index[i]`` is row i's own index in ``train``)."""
    dist = normalized_l2(unit_pixels(released), unit_pixels(train))
    dist[torch.arange(dist.shape[0]), released_index] = float("inf")
    return _quantiles(dist.min(dim=1).values, prefix)


def split_extraction(ext: Extraction, consented: torch.Tensor, noisy: Extraction | None = None) -> dict[str, float]:
    """Extraction counted separately by whom it copies: a released (noisy-only) image - a leak - or a consented one
    (given in the clear); ``consented[j]`` marks training image j. ``noisy`` is the extraction of the same samples
    against the released noisy copies: a sample that copies a noisy copy counts as a released-image extraction too
    (copying the release is memorisation, whatever the release alone reveals). The released rate comes with its
    95% bound."""
    n = int(ext.ratio.shape[0])
    hit_released = ext.extracted & ~consented[ext.nearest]
    if noisy is not None:
        hit_released = hit_released | (noisy.extracted & ~(ext.extracted & consented[ext.nearest]))
    hit_consented = ext.extracted & consented[ext.nearest]
    k = int(hit_released.sum())
    return {"released_extracted_count": float(k), "released_extracted_frac": k / n,
            "released_extracted_upper95": upper_bound(k, n),
            "consented_extracted_count": float(int(hit_consented.sum())),
            "consented_extracted_frac": float(hit_consented.double().mean())}


def _quantiles(x: torch.Tensor, prefix: str) -> dict[str, float]:
    x = x.double()
    q = torch.quantile(x, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {f"{prefix}_mean": float(x.mean()), f"{prefix}_min": float(x.min()), f"{prefix}_p05": float(q[0]),
            f"{prefix}_median": float(q[1]), f"{prefix}_p95": float(q[2])}


def max_cosine_similarity(query: torch.Tensor, train: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """For each query feature row, the maximum cosine similarity to any training row (excluding the same index
    when ``exclude_self``, for the train-vs-train reference)."""
    q = torch.nn.functional.normalize(query.reshape(query.shape[0], -1).double(), dim=1)
    t = torch.nn.functional.normalize(train.reshape(train.shape[0], -1).double(), dim=1)
    out = []
    for i in range(0, q.shape[0], CHUNK):
        sim = q[i:i + CHUNK] @ t.T
        if exclude_self:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + i] = -2.0
        out.append(sim.max(dim=1).values)
    return torch.cat(out)


def similarity_stats(sim: torch.Tensor, prefix: str, threshold: float = 0.5) -> dict[str, float]:
    """Somepalli-style summary: mean, 95th percentile, fraction above ``threshold``."""
    return {f"{prefix}_mean": float(sim.mean()), f"{prefix}_p95": float(torch.quantile(sim, 0.95)),
            f"{prefix}_frac_gt_{threshold:g}": float((sim > threshold).double().mean())}


Features = Callable[[torch.Tensor], torch.Tensor]


def centered_pixels(train: torch.Tensor) -> Features:
    """Raw-pixel feature space for cosine similarity: flat pixels minus the training mean (uncentred non-negative
    pixels would make every pair look similar)."""
    mean = train.reshape(train.shape[0], -1).double().mean(dim=0)
    return lambda x: x.reshape(x.shape[0], -1).double() - mean


def audit_samples(generated: torch.Tensor, train: torch.Tensor, features: Features | None = None,
                  feature_space: str = "pixels", alpha: float = 0.5, n: int = 50) -> dict[str, float]:
    """Every statistic for one set of generated images against the sensitive training set (both in [-1, 1])."""
    ext = carlini_extraction(generated, train, alpha=alpha, n=n)
    out = {"extracted_frac": ext.fraction, "extracted_count": float(int(ext.extracted.sum())),
           **_quantiles(ext.ratio, "carlini_ratio"), **_quantiles(ext.nn_distance, "nn_l2")}
    feat = features or centered_pixels(train)
    ftrain, fgen = feat(train), feat(generated)
    out.update(similarity_stats(max_cosine_similarity(fgen, ftrain), f"maxcos_{feature_space}"))
    out.update(similarity_stats(max_cosine_similarity(ftrain, ftrain, exclude_self=True),
                                f"maxcos_{feature_space}_train_ref"))
    return out


def audit_reconstructions(denoised: torch.Tensor, originals: torch.Tensor, alpha: float = 0.5,
                          n: int = 50) -> dict[str, float]:
    """How close a denoised pool gets to the private originals (row i of ``denoised`` reconstructs row i)."""
    if denoised.shape != originals.shape:
        raise ValueError(f"denoised pool {tuple(denoised.shape)} and originals {tuple(originals.shape)} differ in shape")
    own = (unit_pixels(denoised) - unit_pixels(originals)).norm(dim=1) / unit_pixels(originals).shape[1] ** 0.5
    ext = carlini_extraction(denoised, originals, alpha=alpha, n=n)
    reid = (ext.nearest == torch.arange(denoised.shape[0])).double().mean()
    return {"recon_reid_frac": float(reid), "recon_extracted_frac": ext.fraction,
            **_quantiles(own, "recon_own_l2"), **_quantiles(ext.ratio, "recon_carlini_ratio")}
