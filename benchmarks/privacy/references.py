"""Reference rows of the privacy benchmark, scored in the same metric as the trained models (fd_digits on the val
test half): what real images, the oracle denoiser, the consented set, the noisy copies and a 10-line deconvolution
reach, so a trained model's fd can be placed between them (REFERENCE.md 11b).

Each function returns ``(images [N, C, H, W] in [-1, 1], labels [N])``; images from the public digits copy (the same
images as the sensitive set: the oracle is allowed to know them) and from the release itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _release_set(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A release subset (``noisy``: float CHW; ``clean``: uint8 HWC) as float CHW in model space and labels."""
    from pipeline.data.shards import iter_samples

    xs, ys = [], []
    for _, sample in iter_samples(path):
        im = np.asarray(sample["image.npy"])
        if im.dtype == np.uint8:  # HWC uint8 -> CHW [-1, 1]
            im = im.reshape(im.shape[0], im.shape[1], -1).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        xs.append(torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32)))
        ys.append(int(sample.get("cls", -1)))
    return torch.stack(xs), torch.tensor(ys)


def real_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits train split: the floor any model's samples can reach in this metric."""
    from evals.digits_classifier import digits_images

    return digits_images("train", size=None)  # the stored size, as the models sample it


def consented_replayed(release_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The consented clean images scored as if they were samples (a model that memorised them)."""
    return _release_set(Path(release_dir) / "clean")


def noisy_copies(release_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The released noisy copies themselves, clamped to [-1, 1]."""
    x, y = _release_set(Path(release_dir) / "noisy")
    return x.clamp(-1, 1), y


def oracle_posterior_mean(release_dir: Path, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``E[x | y]`` under the true empirical prior (the digits train images of the copy's class):
    ``sum_j x_j exp(-|y - x_j|^2 / 2 s^2) / sum_j exp(...)``, the best a denoiser that knows the data can do."""
    from evals.digits_classifier import digits_images

    y, labels = _release_set(Path(release_dir) / "noisy")
    prior, prior_labels = digits_images("train", size=None)  # the stored 8x8, the noisy copies' own size
    if prior.shape[1:] != y.shape[1:]:
        raise ValueError(f"oracle prior {tuple(prior.shape[1:])} and noisy copies {tuple(y.shape[1:])} differ in shape")
    flat_prior = prior.flatten(1).double()
    out = torch.empty_like(y)
    for c in labels.unique().tolist():
        mine = labels == c
        xs = flat_prior[prior_labels == c] if c >= 0 else flat_prior
        logw = -torch.cdist(y[mine].flatten(1).double(), xs) ** 2 / (2 * s * s)
        out[mine] = (torch.softmax(logw, 1) @ xs).float().reshape(y[mine].shape)
    return out, labels


def gaussian_deconvolution(release_dir: Path, s: float, per_class: int,
                           seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the Gaussian fitted to the noisy copies with ``s^2 I`` taken off its covariance (eigenvalues
    clipped at 0): ``N(m_c, C_c - s^2 I)``, sampled ``per_class`` times."""
    y, labels = _release_set(Path(release_dir) / "noisy")
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in labels.unique().tolist():
        flat = y[labels == c].flatten(1).double()
        mean = flat.mean(0)
        val, vec = torch.linalg.eigh(torch.cov(flat.T) - s * s * torch.eye(flat.shape[1], dtype=torch.float64))
        root = vec * val.clamp(min=0).sqrt()
        z = torch.randn(per_class, flat.shape[1], generator=g, dtype=torch.float64)
        xs.append((mean + z @ root.T).float().reshape(per_class, *y.shape[1:]).clamp(-1, 1))
        ys.append(torch.full((per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def per_class_subset(x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int,
                     replace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of each class (a seeded draw; without ``replace`` at most as many as the class has), so
    every row is scored on the same count. ``replace``: a small set replayed as a model that emits only it would."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in y.unique().tolist():
        idx = torch.nonzero(y == c).flatten()
        if replace:
            keep.append(idx[torch.randint(idx.numel(), (per_class,), generator=g)])
        else:
            keep.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
    pick = torch.cat(keep)
    return x[pick], y[pick]
