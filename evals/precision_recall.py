"""Improved precision and recall (Kynkäänniemi et al., 2019): k-NN estimates of the two feature manifolds.

Each set's manifold is the union of balls around its points, ball radius = distance to the point's k-th nearest
neighbour within the same set (k = 3 in the paper). Then

    precision = fraction of generated features inside the real manifold   (are samples realistic?)
    recall    = fraction of real features inside the generated manifold   (is the data's variety covered?)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _as_features(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).double()
    if x.dim() != 2 or len(x) < 2:
        raise ValueError(f"precision/recall: {name} features must be (N >= 2, D), got {tuple(x.shape)}")
    return x


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance from every point to its k-th nearest neighbour in the same set (itself excluded)."""
    features = _as_features(features, "manifold")
    if k >= len(features):
        raise ValueError(f"precision/recall: k={k} needs more than {k} features per set, got {len(features)}")
    radii = []
    for block in features.split(chunk):
        d = torch.cdist(block, features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (distance 0)
    return torch.cat(radii)


def coverage_fraction(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of ``queries`` within distance ``radii[i]`` of some ``manifold[i]``."""
    inside = []
    for block in queries.split(chunk):
        inside.append((torch.cdist(block, manifold) <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


@dataclass
class PrecisionRecall:
    precision: float
    recall: float


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> PrecisionRecall:
    """k-NN manifold precision and recall of ``fake`` features against ``real`` features (float64)."""
    real, fake = _as_features(real, "real"), _as_features(fake, "generated")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall: feature dimensions differ ({real.shape[1]} vs {fake.shape[1]})")
    precision = coverage_fraction(real, knn_radii(real, k), fake)
    recall = coverage_fraction(fake, knn_radii(fake, k), real)
    return PrecisionRecall(precision=precision, recall=recall)
