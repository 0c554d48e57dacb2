"""Samplers driven by the exact field of a Gaussian mixture: target law, order of accuracy, NFE, SDE forms,
guidance, likelihood and the TransportObjective seam."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import SamplerConfig, TrainJobConfig, TransportConfig
from pipeline.transport import TransportObjective, build_sampler, build_transport, guided, nll
from pipeline.transport.gaussian_mixture import GaussianMixture
from pipeline.transport.ode import integrate
from pipeline.transport.sde import DIFFUSIONS

PATHS = ["linear", "gvp", "vp", "polynomial", "linear_vp"]
ODE_SOLVERS = {"euler": 32, "heun": 12, "midpoint": 12, "rk4": 6, "pseudo_corrector": 24, "dopri5": 1}
N = 1000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture.default_2d()


def _noise(n=N, seed=0):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def assert_reaches_law(x: torch.Tensor, gm: GaussianMixture) -> None:
    """Mean, covariance and (exact-law) MMD; tolerances ~2x the largest value seen for independent exact draws
    of N = 1000 (mean 0.07, cov 0.12, MMD^2 8e-4 over 20 draws)."""
    assert bool(torch.isfinite(x).all()), "NaN/Inf in samples"
    mean_err = float((x.mean(0) - gm.mean()).norm())
    cov_err = float((torch.cov(x.T) - gm.cov()).norm())
    d = gm.mmd2(x)
    assert mean_err < 0.12 and cov_err < 0.2 and d < 2e-3, (mean_err, cov_err, d)


def test_law_check_has_power(gm):
    """An independent exact draw passes; 10% too wide or shifted by 0.1 fails."""
    x = gm.sample(N, torch.Generator().manual_seed(7))
    assert_reaches_law(x, gm)
    for wrong in (x * 1.1, x + torch.tensor([0.1, 0.0], dtype=torch.float64)):
        with pytest.raises(AssertionError):
            assert_reaches_law(wrong, gm)


# ---------------------------------------------------------------- ODE


@pytest.mark.parametrize("path", PATHS)
def test_every_ode_solver_reaches_the_target_law(gm, path):
    tr = build_transport(TransportConfig(path=path))
    for solver, steps in ODE_SOLVERS.items():
        sampler = build_sampler(tr, SamplerConfig(solver=solver, steps=steps, atol=1e-4, rtol=1e-4))
        out = sampler.sample(gm.model_fn(tr.path, "velocity"), _noise())
        assert_reaches_law(out.x, gm)
        expected = {"euler": steps, "heun": 2 * steps, "midpoint": 2 * steps, "rk4": 4 * steps,
                    "pseudo_corrector": steps + 1}.get(solver)
        if expected is not None:
            assert out.nfe == expected, (solver, out.nfe)
        else:
            assert 6 <= out.nfe < 1000  # dopri5: counted evaluations, not the grid


@pytest.mark.parametrize("prediction", ["score", "noise"])
@pytest.mark.parametrize("path", ["linear", "vp"])
def test_score_and_noise_models_sample_through_conversions(gm, path, prediction):
    tr = build_transport(TransportConfig(path=path, prediction=prediction))
    out = build_sampler(tr, SamplerConfig(solver="heun", steps=12)).sample(gm.model_fn(tr.path, prediction), _noise())
    assert_reaches_law(out.x, gm)


def _order(errors: list[float]) -> float:
    return math.log2(errors[-2] / errors[-1])


# (solver, step counts, expected order); errors are final-state errors per sample against a fine RK4 solution
ORDERS = [("euler", [16, 32, 64], 1.0), ("heun", [8, 16, 32], 2.0), ("midpoint", [8, 16, 32], 2.0),
          ("pseudo_corrector", [8, 16, 32], 2.0), ("rk4", [8, 16, 32], 4.0)]


@pytest.mark.parametrize("path", PATHS)
def test_ode_error_falls_at_the_method_order(gm, path):
    """Smooth paths (Linear, GVP) show each method's order within 0.35; the paths whose sigma' is singular at
    t = 1 or whose field changes fast near the ends (VP, polynomial, LinearVP) are still pre-asymptotic at these
    step counts, so there the error must fall at least at order - 0.9 (and >= 1)."""
    tr = build_transport(TransportConfig(path=path))
    t0, t1 = tr.sample_interval()
    x0 = _noise(32, seed=3)
    f = lambda t, x: gm.velocity(tr.path, x, t)
    ref = integrate(f, x0, "rk4", t0, t1, steps=128)  # ~(32/128)^4 = 0.4% of RK4's error at 32 steps
    smooth = path in ("linear", "gvp")
    for solver, steps, order in ORDERS:
        errs = [float((integrate(f, x0, solver, t0, t1, n) - ref).norm(dim=1).mean()) for n in steps]
        assert errs[0] > errs[1] > errs[2], (solver, errs)
        slope = _order(errs)
        if smooth:
            assert abs(slope - order) < 0.35, (solver, errs, slope)
        else:
            assert slope > max(order - 0.9, 0.8), (solver, errs, slope)


def test_time_shift_grid(gm):
    tr = build_transport(TransportConfig())
    s = build_sampler(tr, SamplerConfig(solver="heun", steps=12, time_shift=3.0))
    assert_reaches_law(s.sample(gm.model_fn(tr.path, "velocity"), _noise()).x, gm)


def test_dopri5_tolerance_controls_nfe_and_error(gm):
    tr = build_transport(TransportConfig(path="gvp"))
    f, x0 = gm.model_fn(tr.path, "velocity"), _noise(64, seed=5)
    ref = integrate(lambda t, x: gm.velocity(tr.path, x, t), x0, "rk4", 0.0, 1.0, steps=128)
    loose = build_sampler(tr, SamplerConfig(solver="dopri5", atol=1e-3, rtol=1e-3)).sample(f, x0)
    tight = build_sampler(tr, SamplerConfig(solver="dopri5", atol=1e-7, rtol=1e-7)).sample(f, x0)
    assert tight.nfe > loose.nfe
    assert float((tight.x - ref).abs().max()) < 2e-5 < float((loose.x - ref).abs().max())


# ---------------------------------------------------------------- SDE


@pytest.mark.parametrize("diffusion", DIFFUSIONS)
def test_every_sde_diffusion_form_reaches_the_target_law(gm, diffusion):
    """Euler-Maruyama to t = 0.96, then an ODE (Euler) last step: every D gives the ODE's marginals."""
    tr = build_transport(TransportConfig())
    cfg = SamplerConfig(method="sde", solver="euler", steps=100, diffusion=diffusion, last_step="euler")
    out = build_sampler(tr, cfg).sample(gm.model_fn(tr.path, "velocity"), _noise(),
                                        generator=torch.Generator().manual_seed(1))
    assert out.nfe == 101
    assert_reaches_law(out.x, gm)


@pytest.mark.parametrize("last_step", ["none", "mean", "tweedie", "euler"])
def test_sde_heun_and_last_steps(gm, last_step):
    tr = build_transport(TransportConfig(path="gvp", prediction="score"))
    cfg = SamplerConfig(method="sde", solver="heun", steps=40, diffusion="sigma", last_step=last_step,
                        diffusion_norm=0.5)
    out = build_sampler(tr, cfg).sample(gm.model_fn(tr.path, "score"), _noise(),
                                        generator=torch.Generator().manual_seed(2))
    assert out.nfe == 80 + (last_step != "none")
    assert_reaches_law(out.x, gm)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", ["velocity", "score", "noise"])
def test_no_nan_at_the_endpoints(gm, path, prediction):
    """The stiffest combination (SBDM, whose coefficient diverges at t = 0) and an ODE from the default eps."""
    tr = build_transport(TransportConfig(path=path, prediction=prediction))
    fn = gm.model_fn(tr.path, prediction)
    for cfg in (SamplerConfig(method="sde", steps=20, diffusion="sbdm", last_step="tweedie"),
                SamplerConfig(method="sde", steps=20, diffusion="constant", last_step="none"),
                SamplerConfig(solver="euler", steps=4)):
        x = build_sampler(tr, cfg).sample(fn, _noise(64), generator=torch.Generator().manual_seed(0)).x
        assert bool(torch.isfinite(x).all()), (path, prediction, cfg)


def test_sde_generator_reproducible_and_bad_config():
    tr = build_transport(TransportConfig())
    s = build_sampler(tr, SamplerConfig(method="sde", steps=5))
    fn = lambda x, t: -x
    a = s.sample(fn, _noise(8), generator=torch.Generator().manual_seed(4)).x
    b = s.sample(fn, _noise(8), generator=torch.Generator().manual_seed(4)).x
    torch.testing.assert_close(a, b)
    explicit = build_transport(TransportConfig(sample_eps=0.0))
    with pytest.raises(ValueError, match="sbdm diverges"):
        build_sampler(explicit, SamplerConfig(method="sde", diffusion="sbdm")).sample(fn, _noise(8))


# ---------------------------------------------------------------- guidance


class _LabelModel(torch.nn.Module):
    """v = embedding[y] (+ 0 * x): cond and uncond predictions are distinguishable; records call batch sizes."""

    def __init__(self, num_classes=3, dim=2):
        super().__init__()
        self.emb = torch.nn.Embedding(num_classes + 1, dim)
        self.calls: list[int] = []

    def forward(self, x, t, y):
        self.calls.append(x.shape[0])
        return self.emb(y).to(x.dtype) + 0 * x


def test_guidance_batches_and_interval():
    torch.manual_seed(0)
    model = _LabelModel()
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    cond, uncond = model(x, None, y), model(x, None, torch.full_like(y, 3))
    model.calls.clear()
    g = guided(model, null_label=3, scale=4.0, t_min=0.2, t_max=0.6)
    out = g(x, torch.full((4,), 0.5, dtype=torch.float64), y=y)
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond))
    assert model.calls == [8]  # cond and uncond in one batched call
    model.calls.clear()
    torch.testing.assert_close(g(x, torch.full((4,), 0.9, dtype=torch.float64), y=y), cond)
    assert model.calls == [4]  # outside the interval: conditional only, no wasted uncond pass
    mixed = g(x, torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64), y=y)
    torch.testing.assert_close(mixed[[0, 3]], cond[[0, 3]])
    torch.testing.assert_close(mixed[[1, 2]], (uncond + 4.0 * (cond - uncond))[[1, 2]])
    with pytest.raises(ValueError, match="t_min"):
        guided(model, 3, 2.0, t_min=0.8, t_max=0.2)


# ---------------------------------------------------------------- likelihood


def test_nll_matches_the_exact_log_density(gm):
    tr = build_transport(TransportConfig())
    x1 = gm.sample(64, torch.Generator().manual_seed(9))
    true = -gm.log_prob(x1) / 2
    exact = nll(tr, gm.model_fn(tr.path, "velocity"), x1, exact_divergence=True, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(exact.nats_per_dim, true, atol=5e-3, rtol=0)
    torch.testing.assert_close(exact.bits_per_dim, true / math.log(2), atol=1e-2, rtol=0)
    assert exact.nfe > 0
    hutch = nll(tr, gm.model_fn(tr.path, "velocity"), x1, exact_divergence=False, atol=1e-5, rtol=1e-5,
                generator=torch.Generator().manual_seed(0))
    # Hutchinson is unbiased per sample: the batch mean is close, individual values scatter
    assert abs(float(hutch.nats_per_dim.mean() - true.mean())) < 0.1
    assert float((hutch.nats_per_dim - true).abs().max()) > 1e-3
    with8bit = nll(tr, gm.model_fn(tr.path, "velocity"), x1[:4], pixel_levels=256, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with8bit.bits_per_dim, with8bit.nats_per_dim / math.log(2) + 7.0)


# ---------------------------------------------------------------- objective seam


class _TinyNet(torch.nn.Module):
    """A tiny class-conditional conv net model(x, t, y) with learn_sigma-style doubled output."""

    def __init__(self, channels=1, num_classes=10):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels + 1, 2 * channels, 3, padding=1)
        self.emb = torch.nn.Embedding(num_classes + 1, 1)
        self.calls: list[int] = []

    def forward(self, x, t, y):
        self.calls.append(x.shape[0])
        cond = (t[:, None, None, None] + self.emb(y)[:, :, None, None]).expand(-1, 1, *x.shape[2:])
        return self.conv(torch.cat([x, cond], 1))


@pytest.mark.parametrize("path,prediction", [("linear", "velocity"), ("vp", "noise"), ("gvp", "score")])
def test_transport_objective_loss_and_sample(path, prediction):
    cfg = TrainJobConfig.model_validate({
        "transport": {"path": path, "prediction": prediction, "time_sampler": "logit_normal", "resolution_shift": True},
        "sampler": {"method": "ode", "solver": "heun", "steps": 3},
        "guidance": {"scale": 2.0, "t_max": 0.5}})
    obj = TransportObjective.from_config(cfg, num_classes=10)
    torch.manual_seed(0)
    model = _TinyNet()
    batch = {"image": torch.rand(4, 1, 8, 8) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    loss = obj.loss(model, batch)
    assert loss.dim() == 0 and bool(torch.isfinite(loss))
    loss.backward()
    assert model.conv.weight.grad is not None and bool(torch.isfinite(model.conv.weight.grad).all())
    model.calls.clear()
    with torch.no_grad():
        a = obj.sample(model, {"label": torch.tensor([1, 2])}, (2, 1, 8, 8), torch.Generator().manual_seed(0))
        b = obj.sample(model, {"label": torch.tensor([1, 2])}, (2, 1, 8, 8), torch.Generator().manual_seed(0))
    assert a.x.shape == (2, 1, 8, 8) and a.nfe == 6 and bool(torch.isfinite(a.x).all())
    torch.testing.assert_close(a.x, b.x)
    assert 4 in model.calls and 2 in model.calls  # guided (2B) inside [0, 0.5], conditional (B) after it
