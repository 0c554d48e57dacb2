"""Fréchet distance between Gaussians and streaming, mergeable feature statistics.

For feature sets summarised as Gaussians N(mu1, S1) and N(mu2, S2),

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

This is FID when the features are Inception-v3 pool3 with the 2015-12-05 weights (see ``evals.inception``);
in any other feature space it is "a Fréchet distance" and must be named after that space (e.g. ``fd_digits``).
Everything is computed in float64.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``(S1 S2)^{1/2}`` comes from ``scipy.linalg.sqrtm``. If it is not finite (near-singular covariances, e.g. fewer
    samples than dimensions) both covariances are offset by ``eps * I`` and it is recomputed. A complex result whose
    diagonal has a non-negligible imaginary part is an error; otherwise the (numerical) imaginary part is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"Fréchet distance: mean vectors differ in shape ({mu1.shape} vs {mu2.shape})")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"Fréchet distance: covariances {sigma1.shape}, {sigma2.shape} do not match means {mu1.shape}")

    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products are expected (fewer samples than dimensions)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(covmean.imag))
            raise ValueError(f"Fréchet distance: matrix square root has a large imaginary component ({worst:.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class RunningStats:
    """Streaming mean and covariance of feature vectors, in float64, mergeable across workers.

    Keeps the count ``n``, the mean and the centred outer-product sum ``M2 = sum_i (f_i - mean)(f_i - mean)^T``.
    Adding a batch and merging two accumulators use the same pairwise update (Chan et al.):
    ``M2 = M2_a + M2_b + delta delta^T n_a n_b / n`` with ``delta = mean_b - mean_a``, which avoids the
    cancellation of the raw ``sum f f^T - n mu mu^T`` form. ``cov`` is the unbiased estimate ``M2 / (n - 1)``,
    matching ``np.cov(features, rowvar=False)``.
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.n = 0
        self._mean = np.zeros(self.dim, np.float64)
        self._m2 = np.zeros((self.dim, self.dim), np.float64)

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if n_b == 0:
            return
        n = self.n + n_b
        delta = mean_b - self._mean
        # not in place: arrays deserialised by Ray (zero-copy) are read-only
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * n_b / n)
        self._mean = self._mean + delta * (n_b / n)
        self.n = n

    def update(self, features: np.ndarray | torch.Tensor) -> "RunningStats":
        """Add a batch of features of shape (B, dim)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"RunningStats: expected features of shape (B, {self.dim}), got {tuple(f.shape)}")
        if len(f):
            mean_b = f.mean(axis=0)
            centred = f - mean_b
            self._combine(len(f), mean_b, centred.T @ centred)
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Fold another accumulator (e.g. from another worker) into this one; returns self."""
        if other.dim != self.dim:
            raise ValueError(f"RunningStats: cannot merge dimension {other.dim} into {self.dim}")
        self._combine(other.n, other._mean, other._m2)
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("RunningStats: no features were added")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"RunningStats: a covariance needs at least 2 samples, have {self.n}")
        return self._m2 / (self.n - 1)

    def save(self, path: str | Path) -> None:
        """Write ``mu`` and ``sigma`` (the ADM evaluation-suite npz format) plus the count ``n``."""
        save_stats(path, self.mean, self.cov, n=self.n)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, n: int | None = None) -> None:
    """Save Gaussian statistics as an npz with ``mu`` and ``sigma`` (and ``n`` when known)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if n is None else {"n": np.asarray(n)}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)
    tmp.replace(path)


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load ``(mu, sigma)`` from an npz (ADM reference-batch format: keys ``mu`` and ``sigma``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path} (an npz with 'mu' and 'sigma')")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"reference statistics {path} lack {', '.join(missing)} (keys found: {', '.join(data.files)})")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
