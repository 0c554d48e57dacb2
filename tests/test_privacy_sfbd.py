"""SFBD pieces: t* on every path, denoising by the reverse ODE, schedules, pool, mixed loss."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline.config import TransportConfig
from pipeline.transport import build_transport
from pipeline.transport.gaussian_mixture import GaussianMixture
from privacy.sfbd import DenoisedPool, Schedule, denoise, mixed_loss, noise_time, ramp

PATHS = ["linear", "gvp", "vp", "polynomial", "linear_vp"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("s", [0.2, 0.59, 1.38])
def test_t_star_maps_s_for_every_path(path, s):
    transport = build_transport(TransportConfig(path=path))
    t = torch.tensor(noise_time(transport, s), dtype=torch.float64)
    assert 0 < float(t) < 1
    assert float(transport.path.sigma(t) / transport.path.alpha(t)) == pytest.approx(s, rel=1e-6)


@pytest.mark.parametrize("path", ["vp"])  # the curved path; Linear's t* has its closed form checked above
def test_denoising_with_the_exact_field_recovers_the_data_law(path):
    """alpha(t*) y has the law of x_t*, so the exact reverse ODE from t* maps noisy copies back to the data law."""
    gm = GaussianMixture.default_2d()
    transport = build_transport(TransportConfig(path=path))
    g = torch.Generator().manual_seed(0)
    x = gm.sample(1000, generator=g)
    s = 0.59
    y = x + s * torch.randn(x.shape, generator=g, dtype=torch.float64)
    x_hat, nfe = denoise(SimpleNamespace(transport=transport), gm.model_fn(transport.path, "velocity"), y, s,
                         steps=20, solver="heun")
    assert nfe == 40
    assert torch.allclose(x_hat.mean(0), gm.mean(), atol=0.08)
    assert torch.allclose(torch.cov(x_hat.T), gm.cov(), atol=0.12)
    # noisy copies themselves are far off in covariance (s^2 = 0.35 added on the diagonal)
    assert (torch.cov(y.T) - gm.cov()).diagonal().min() > 0.3
    # and the wrong start time (as if s were 3x larger) does not recover it
    wrong, _ = denoise(SimpleNamespace(transport=transport), gm.model_fn(transport.path, "velocity"), y, 3 * s,
                       steps=10)
    assert (torch.cov(wrong.T) - gm.cov()).abs().max() > 0.25


def test_schedules():
    flow = Schedule("sfbd_flow", total_steps=100, warmup_steps=20, refresh_every=10, ramp_start=20, ramp_end=60)
    assert [k for k in range(100) if flow.refresh(k)] == [20, 30, 40, 50, 60, 70, 80, 90]
    assert flow.refresh(20) == "full" and flow.refresh(30) == "chunk"
    assert [flow.weight(k) for k in (0, 19, 20, 40, 60, 99)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    sfbd = Schedule("sfbd", total_steps=100, warmup_steps=40, rounds=3)
    assert sfbd.round_starts() == [40, 60, 80] and [k for k in range(100) if sfbd.refresh(k)] == [40, 60, 80]
    assert sfbd.weight(39) == 0.0 and sfbd.weight(40) == 1.0
    assert Schedule("noisy_only", 10).weight(0) == 1.0 and not Schedule("noisy_only", 10).uses_clean
    assert Schedule("clean_only", 10).weight(5) == 0.0 and not Schedule("clean_only", 10).uses_pool
    assert ramp(5, 0, 10) == 0.5 and ramp(5, 5, 5) == 1.0
    with pytest.raises(ValueError, match="privacy.method"):
        Schedule("dp_sgd", 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        Schedule("sfbd", 10, warmup_steps=10)


def test_pool_refreshes_cyclically_and_mixed_loss():
    pool = DenoisedPool(torch.arange(10.0).reshape(10, 1), torch.zeros(10, dtype=torch.long))
    with pytest.raises(RuntimeError, match="empty"):
        pool.sample(2, torch.Generator())
    pool.update(pool.next_indices(None), torch.zeros(10, 1))
    idx = pool.next_indices(4)
    assert idx.tolist() == [0, 1, 2, 3]
    pool.update(idx, torch.ones(4, 1))
    assert pool.next_indices(8).tolist() == [4, 5, 6, 7, 8, 9, 0, 1]
    assert pool.refreshes == 2 and pool.last_change == 1.0 and bool(pool.valid.all())
    assert mixed_loss(torch.tensor(1.0), torch.tensor(3.0), 10, 90, 1.0) == pytest.approx(2.8)
    assert mixed_loss(torch.tensor(1.0), torch.tensor(3.0), 10, 90, 0.0) == 1.0
    assert mixed_loss(None, torch.tensor(3.0), 0, 90, 1.0) == 3.0


def test_a_refresh_larger_than_a_workers_pool_share_is_refused_in_one_line():
    """SFBD flow's refresh would be cut to the whole slice: refused, naming privacy.refresh_size."""
    from pipeline.errors import DataError
    from privacy.train import check_refresh_size

    check_refresh_size("sfbd_flow", 64, n_noisy=129, world=2)  # 64 of the smallest share (64) is fine
    check_refresh_size("sfbd_flow", None, n_noisy=10, world=2)  # the whole share
    check_refresh_size("sfbd", 500, n_noisy=10, world=2)  # plain SFBD denoises whole rounds
    with pytest.raises(DataError, match=r"privacy.refresh_size=65 .*64 noisy copies") as err:
        check_refresh_size("sfbd_flow", 65, n_noisy=129, world=2)
    assert "\n" not in str(err.value)
