"""Fréchet distance and streaming statistics (evals/frechet.py)."""
import numpy as np
import pytest
import scipy.linalg

from evals.frechet import RunningStats, frechet_distance, load_stats, save_stats


def _random_stats(rng: np.random.Generator, dim: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    f = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    return f.mean(0), np.cov(f, rowvar=False)


def _direct(mu1, s1, mu2, s2) -> float:
    """Independent route: Tr((S1^1/2 S2 S1^1/2)^1/2) via symmetric eigendecompositions."""
    r1 = scipy.linalg.sqrtm(s1).real
    w = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(w, 0, None))))


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_matches_direct_scipy(dim):
    rng = np.random.default_rng(dim)
    mu1, s1 = _random_stats(rng, dim, 4 * dim)
    mu2, s2 = _random_stats(rng, dim, 4 * dim)
    d = frechet_distance(mu1, s1, mu2, s2)
    assert d > 0
    assert d == pytest.approx(_direct(mu1, s1, mu2, s2), rel=1e-6)


def test_closed_form_for_diagonal_gaussians():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_distance_to_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(10, 32))  # fewer samples than dimensions: rank-deficient covariance
    mu, s = f.mean(0), np.cov(f, rowvar=False)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-4 * np.trace(s)
    mu, s = _random_stats(rng, 16, 200)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)


def test_merged_stats_equal_one_pass():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(301, 8)) * 3 + 100.0  # large mean: the centred update must not lose precision
    one = RunningStats(8).update(f)
    parts = [RunningStats(8).update(chunk) for chunk in np.array_split(f, [0, 7, 100, 250])]
    merged = RunningStats(8)
    for p in parts:
        merged.merge(p)
    for s in (one, merged):
        assert s.n == 301
        np.testing.assert_allclose(s.mean, f.mean(0), rtol=1e-12)
        np.testing.assert_allclose(s.cov, np.cov(f, rowvar=False), rtol=1e-10)


def test_merge_into_read_only_arrays():
    """Accumulators that come back from Ray workers hold read-only (zero-copy) arrays."""
    rng = np.random.default_rng(3)
    a, b = RunningStats(3).update(rng.normal(size=(5, 3))), RunningStats(3).update(rng.normal(size=(6, 3)))
    for arr in (a._mean, a._m2):
        arr.setflags(write=False)
    a.merge(b)
    assert a.n == 11


def test_npz_roundtrip_and_errors(tmp_path):
    stats = RunningStats(4).update(np.random.default_rng(2).normal(size=(20, 4)))
    stats.save(tmp_path / "ref.npz")
    mu, sigma = load_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu, stats.mean)
    np.testing.assert_array_equal(sigma, stats.cov)
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ValueError, match="sigma"):
        load_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_stats(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="shape"):
        RunningStats(3).update(np.zeros((2, 4)))
    save_stats(tmp_path / "x.npz", mu, sigma)
    assert frechet_distance(*load_stats(tmp_path / "x.npz"), mu, sigma) == pytest.approx(0, abs=1e-9)
