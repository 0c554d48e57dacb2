"""Paths, prediction conversions, training-time samplers, eps defaults and the training loss."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import TransportConfig
from pipeline.transport import build_path, build_transport, default_eps, time_for_noise_level
from pipeline.transport import predictions as P
from pipeline.transport.gaussian_mixture import GaussianMixture
from pipeline.transport.timesteps import (
    flux_mu,
    resolution_shift,
    sample_mode,
    sample_train_times,
    shift_time,
    time_grid,
)

PATHS = ["linear", "gvp", "vp", "polynomial", "linear_vp"]
KINDS = ["velocity", "score", "noise"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _path(name, **kw):
    return build_path(TransportConfig(path=name, **kw))


@pytest.mark.parametrize("name", PATHS)
def test_derivatives_match_autograd_and_endpoints(name):
    path = _path(name)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64, requires_grad=True)
    for f, df in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        (g,) = torch.autograd.grad(f(t).sum(), t)
        torch.testing.assert_close(df(t.detach()), g, rtol=1e-9, atol=1e-9)
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    assert float(path.alpha(one)) == pytest.approx(1.0) and float(path.sigma(one)) == pytest.approx(0.0, abs=1e-12)
    assert float(path.sigma(zero)) == pytest.approx(1.0, abs=1e-4)
    assert float(path.alpha(zero)) == pytest.approx(0.0, abs=7e-3)  # VP: exp(-5.025) = 0.0066
    assert path.name == name


def test_path_formulas_and_config():
    t = torch.tensor([0.3], dtype=torch.float64)
    assert float(_path("gvp").alpha(t)) == pytest.approx(math.sin(0.15 * math.pi))
    vp = _path("vp", vp_beta_min=0.1, vp_beta_max=20.0)
    m = -0.25 * 0.7**2 * 19.9 - 0.5 * 0.7 * 0.1
    assert float(vp.alpha(t)) == pytest.approx(math.exp(m))
    assert float(vp.sigma(t)) == pytest.approx(math.sqrt(1 - math.exp(2 * m)))
    assert float(_path("polynomial", polynomial_n=3).alpha(t)) == pytest.approx(0.027)
    assert float(_path("linear_vp").sigma(t)) == pytest.approx(math.sqrt(1 - 0.09))
    with pytest.raises(ValueError, match="vp_beta_max"):
        _path("vp", vp_beta_min=5.0, vp_beta_max=1.0)


@pytest.mark.parametrize("name", PATHS)
def test_time_for_noise_level(name):
    path = _path(name)
    for s in (0.1, 0.59, 1.38, 5.0):
        t = time_for_noise_level(path, s)
        tt = torch.tensor(t, dtype=torch.float64)
        assert float(path.sigma(tt) / path.alpha(tt)) == pytest.approx(s, rel=1e-6)
    if name == "linear":
        assert time_for_noise_level(path, 0.59) == pytest.approx(1 / 1.59, rel=1e-15)
    with pytest.raises(ValueError, match="noise level"):
        time_for_noise_level(path, 0.0)
    if name == "vp":  # sigma/alpha <= 152 on VP(0.1, 20)
        with pytest.raises(ValueError, match="exceeds"):
            time_for_noise_level(path, 1000.0)


@pytest.mark.parametrize("name", PATHS)
def test_prediction_conversions_round_trip(name):
    path = _path(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(64, generator=g, dtype=torch.float64)
    for src in KINDS:
        pred = torch.randn(x.shape, generator=g, dtype=torch.float64)
        for dst in KINDS:
            there = P.convert(pred, src, dst, path, x, t)
            back = P.convert(there, dst, src, path, x, t)
            torch.testing.assert_close(back, pred, rtol=1e-8, atol=1e-8)
        # all routes to the data estimate agree
        x1 = P.to_data(pred, src, path, x, t)
        for dst in KINDS:
            torch.testing.assert_close(P.to_data(P.convert(pred, src, dst, path, x, t), dst, path, x, t), x1)


@pytest.mark.parametrize("name", PATHS)
def test_closed_form_fields_are_consistent(name):
    """Exact GMM score = autograd of log p_t; exact velocity = the score converted with the path's formula."""
    gm, path = GaussianMixture.default_2d(), _path(name)
    x = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    for tv in (0.1, 0.5, 0.9):
        t = torch.tensor(tv, dtype=torch.float64)
        xg = x.clone().requires_grad_(True)
        (auto,) = torch.autograd.grad(gm.log_prob(xg, path, t).sum(), xg)
        torch.testing.assert_close(gm.score(path, x, t), auto)
        torch.testing.assert_close(P.to_velocity(gm.score(path, x, t), "score", path, x, t), gm.velocity(path, x, t))
        torch.testing.assert_close(P.to_velocity(gm.noise(path, x, t), "noise", path, x, t), gm.velocity(path, x, t))


def test_velocity_to_score_is_finite_where_alpha_vanishes():
    path, x = _path("linear"), torch.randn(8, 2, dtype=torch.float64)
    score = P.to_score(torch.zeros_like(x), "velocity", path, x, torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(score, -x)  # p_0 = N(0, I); v(x, 0) = E[x1] = 0 here


def test_default_eps_and_independent_overrides():
    assert default_eps(_path("linear"), "velocity") == (0.0, 0.0)
    assert default_eps(_path("gvp"), "velocity") == (0.0, 0.0)
    assert default_eps(_path("vp"), "velocity") == (1e-5, 1e-3)
    assert default_eps(_path("linear"), "score") == (1e-3, 1e-3)
    assert default_eps(_path("gvp"), "noise") == (1e-3, 1e-3)
    assert default_eps(_path("linear_vp"), "velocity") == (1e-3, 1e-3)
    # SiT's bug: setting train_eps alone left sample_eps unset. Here each keeps its own default.
    tr = build_transport(TransportConfig(path="vp", train_eps=0.01))
    assert (tr.train_eps, tr.sample_eps) == (0.01, 1e-3)
    tr = build_transport(TransportConfig(path="linear", prediction="score", sample_eps=0.02))
    assert (tr.train_eps, tr.sample_eps) == (1e-3, 0.02)
    assert tr.sample_interval() == (0.02, 0.98)
    # SDEs start away from t = 0 unless sample_eps is set explicitly
    assert build_transport(TransportConfig()).sample_interval(sde=True) == (1e-3, 1.0)
    assert build_transport(TransportConfig(sample_eps=0.0)).sample_interval(sde=True) == (0.0, 1.0)


def test_time_samplers():
    g = torch.Generator().manual_seed(0)
    n = 20000
    cfg = TransportConfig(time_sampler="logit_normal", logit_mean=1.5, logit_std=1.0)
    t = sample_train_times(cfg, n, 0.0, generator=g)
    torch.testing.assert_close(torch.logit(t).mean(), torch.tensor(1.5), atol=0.03, rtol=0)
    t = sample_mode(n, 1.29, generator=g)
    assert 0 <= float(t.min()) and float(t.max()) <= 1
    assert float(t.mean()) == pytest.approx(0.5, abs=0.01)  # symmetric about 1/2
    assert float(((t > 0.3) & (t < 0.7)).float().mean()) > 0.5  # mass concentrated mid-way (uniform: 0.4)
    t = sample_train_times(TransportConfig(), n, 0.01, generator=g)
    assert float(t.min()) >= 0.01 and float(t.max()) <= 0.99
    with pytest.raises(ValueError, match="resolution_shift"):
        sample_train_times(TransportConfig(resolution_shift=True), 4, 0.0)


def test_flux_shift():
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)
    # FLUX convention: noise level s -> e^mu / (e^mu + (1/s - 1)); ours t = 1 - s
    s = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    mu = flux_mu(4096)
    expected = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    torch.testing.assert_close(1 - resolution_shift(1 - s, 4096), expected)
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_time(u, 1.0), u)
    assert bool((shift_time(u, 3.0) <= u + 1e-12).all())  # shift > 1 spends more time near noise
    grid = time_grid(0.0, 1.0, 10, shift=3.0)
    assert float(grid[0]) == 0.0 and float(grid[-1]) == 1.0 and bool((grid.diff() > 0).all())


# ---------------------------------------------------------------- training loss


class _Exact(torch.nn.Module):
    """An exact 'model' for the GMM (with an optional learn_sigma half of junk channels)."""

    def __init__(self, gm, path, kind, learn_sigma=False):
        super().__init__()
        self.fn, self.learn_sigma = gm.model_fn(path, kind), learn_sigma

    def forward(self, x, t, **kw):
        out = self.fn(x, t)
        return torch.cat([out, torch.full_like(out, 1e6)], 1) if self.learn_sigma else out


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_training_loss_is_finite_and_minimised_by_the_exact_field(name, kind):
    gm = GaussianMixture.default_2d()
    g = torch.Generator().manual_seed(0)
    x1 = gm.sample(4096, g)
    tr = build_transport(TransportConfig(path=name, prediction=kind))
    exact = _Exact(gm, tr.path, kind, learn_sigma=True)
    out = tr.training_loss(exact, x1, generator=torch.Generator().manual_seed(1))
    assert out.loss.shape == (4096,) and bool(torch.isfinite(out.loss).all())
    assert float(out.t.min()) >= tr.train_eps and float(out.t.max()) <= 1 - tr.train_eps
    worse = tr.training_loss(lambda x, t: exact.fn(x, t) * 1.1 + 0.05, x1, generator=torch.Generator().manual_seed(1))
    assert float(out.loss.mean()) < float(worse.loss.mean())
    if kind != "velocity":  # SiT's weights blow up near the ends: they must stay finite at train_eps
        for weight in ("velocity", "likelihood"):
            tr = build_transport(TransportConfig(path=name, prediction=kind, loss_weight=weight))
            t = torch.tensor([tr.train_eps, 0.5, 1 - tr.train_eps], dtype=torch.float64)
            assert bool(torch.isfinite(tr.training_loss(exact, x1[:3], t=t).loss).all())


def test_training_loss_weights_and_targets():
    path = _path("linear")
    x1, x0 = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    t = torch.full((4,), 0.25, dtype=torch.float64)
    zero = lambda x, t: torch.zeros_like(x)
    v = build_transport(TransportConfig()).training_loss(zero, x1, x0=x0, t=t).loss
    torch.testing.assert_close(v, ((x1 - x0) ** 2).mean(1))
    drift_var = 0.75 / 0.25  # Linear: (1 - t) / t
    for weight, w in (("none", 1.0), ("velocity", (drift_var / 0.75) ** 2), ("likelihood", drift_var / 0.75**2)):
        n = build_transport(TransportConfig(prediction="noise", loss_weight=weight)).training_loss(zero, x1, x0=x0, t=t)
        torch.testing.assert_close(n.loss, w * (x0**2).mean(1))
        s = build_transport(TransportConfig(prediction="score", loss_weight=weight)).training_loss(zero, x1, x0=x0, t=t)
        torch.testing.assert_close(s.loss, w * (x0**2).mean(1))
    assert float(path.drift_var(torch.tensor(0.25))) == pytest.approx(drift_var)
    with pytest.raises(ValueError, match="does not match"):
        build_transport(TransportConfig()).training_loss(lambda x, t: x[:, :1], x1)
