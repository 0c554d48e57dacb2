"""k-NN manifold precision/recall (evals/precision_recall.py)."""
import numpy as np
import pytest
import torch

from evals.precision_recall import knn_radii, precision_recall


def _brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])

    def covered(manifold, r, queries):
        return np.mean([any(np.linalg.norm(q - m) <= rm for m, rm in zip(manifold, r)) for q in queries])

    return covered(real, radii(real), fake), covered(fake, radii(fake), real)


def test_matches_brute_force():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(60, 5)), rng.normal(size=(50, 5)) * 0.8 + 0.8
    pr = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3)
    assert (pr.precision, pr.recall) == pytest.approx(_brute_force(real, fake, 3))
    assert 0 < pr.precision < 1 and 0 < pr.recall < 1


def test_mode_dropping_lowers_recall_not_precision():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0]])
    real = torch.cat([c + torch.randn(300, 2, generator=g) for c in centres])
    one_mode = centres[0] + torch.randn(300, 2, generator=g)
    pr = precision_recall(real, one_mode)
    assert pr.precision > 0.9 and 0.4 < pr.recall < 0.6
    same = precision_recall(real, real.clone())
    assert same.precision == 1.0 and same.recall == 1.0
    far = precision_recall(real, one_mode + 100)
    assert far.precision == 0.0 and far.recall == 0.0


def test_radii_exclude_self_and_bad_input():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="k=3"):
        knn_radii(x[:3], k=3)
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(torch.zeros(5, 2), torch.zeros(5, 3))
