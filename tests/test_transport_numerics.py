"""Sampler numerics at the edges, on the exact field of a Gaussian mixture: SBDM's unbounded coefficient near t0
(the state's variance stays bounded at every step) and dopri5's per-sample error control (a sample's result does
not depend on its batch-mates)."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import SamplerConfig, TransportConfig
from pipeline.transport import build_sampler, build_transport
from pipeline.transport.gaussian_mixture import GaussianMixture
from pipeline.transport.ode import dopri5_per_sample
from pipeline.transport.sde import OU_GUARD


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture.default_2d()


def _noise(n, seed=0):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def marginal_variance_bound(gm: GaussianMixture, path) -> float:
    """The largest total variance of x_t = alpha x1 + sigma x0 over t: max(alpha^2 tr Cov + 2 sigma^2 + ...)."""
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    a, s = path.alpha(t), path.sigma(t)
    mean2, cov = float(gm.mean().pow(2).sum()), float(torch.trace(gm.cov()))
    return float((a**2 * (cov + mean2) + 2 * s**2).max())


@pytest.mark.parametrize("steps", [8, 32, 100])
@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_sbdm_state_variance_is_bounded_at_every_step(gm, path, steps):
    """SBDM: D = drift_var ~ 1/t at t0 = 1e-3. Euler-Maruyama's first step would multiply x by about 1 - lam h
    (-29 with 32 steps: second moment ~900); the guarded step keeps every state's second moment near the
    marginal's."""
    tr = build_transport(TransportConfig(path=path))
    sampler = build_sampler(tr, SamplerConfig(method="sde", steps=steps, diffusion="sbdm", last_step="mean"))
    states = sampler.trajectory(gm.model_fn(tr.path, "velocity"), _noise(2000), generator=torch.Generator().manual_seed(1))
    bound = marginal_variance_bound(gm, tr.path)
    second_moments = [float(x.pow(2).sum(1).mean()) for x in states]
    assert max(second_moments) < 1.5 * bound, (bound, [round(m, 2) for m in second_moments[:4]])
    assert len(states) == steps + 1


def test_the_guard_is_needed_and_leaves_mild_steps_alone(gm):
    """Plain Euler-Maruyama on SBDM's first step really blows up (the guard is not decorative), and a mild setting
    (SiT's: sigma form, 250 steps) never triggers the guard: it stays exactly Euler-Maruyama."""
    tr = build_transport(TransportConfig())
    t0, t_end = 1e-3, 0.96
    h = (t_end - t0) / 32
    lam = float(tr.path.drift_var(torch.tensor(t0, dtype=torch.float64)) / tr.path.sigma(torch.tensor(t0)) ** 2)
    assert lam * h > 25  # EM factor 1 - lam h < -24 on x - m
    h_sit = (t_end - t0) / 250
    t = torch.linspace(t0, t_end, 251, dtype=torch.float64)
    lam_sit = tr.path.sigma(t) / tr.path.sigma(t) ** 2  # D = sigma(t), norm 1
    assert float((lam_sit * h_sit).max()) < OU_GUARD


def test_dopri5_result_does_not_depend_on_batch_mates(gm):
    """A sample solved alone equals the same sample solved next to hard batch-mates (far in the tails, where the
    field is stiffer); with a shared batch error norm the step sizes, hence the result, would differ."""
    tr = build_transport(TransportConfig())
    field = gm.model_fn(tr.path, "velocity")
    easy = _noise(4, seed=3)
    hard = 6.0 * _noise(28, seed=4)  # tails: large |x0|
    f = lambda t, x: tr.velocity(field, x, t)
    alone = dopri5_per_sample(f, easy, 0.0, 1.0, atol=1e-5, rtol=1e-5)
    mixed = dopri5_per_sample(f, torch.cat([easy, hard]), 0.0, 1.0, atol=1e-5, rtol=1e-5)[:4]
    torch.testing.assert_close(mixed, alone, atol=1e-12, rtol=0)


def test_dopri5_per_sample_error_is_within_tolerance(gm):
    """Against a very tight reference, each sample's error scales with the tolerance (monotone) and stays within
    a small multiple of atol + rtol |x|."""
    tr = build_transport(TransportConfig())
    field = gm.model_fn(tr.path, "velocity")
    f = lambda t, x: tr.velocity(field, x, t)
    x0 = _noise(64, seed=5)
    ref = dopri5_per_sample(f, x0, 0.0, 1.0, atol=1e-11, rtol=1e-11)
    worst = []
    for tol in (1e-3, 1e-5, 1e-7):
        x = dopri5_per_sample(f, x0, 0.0, 1.0, atol=tol, rtol=tol)
        err = (x - ref).norm(dim=1)
        worst.append(float(err.max()))
    assert worst[0] > worst[1] > worst[2], worst
    assert worst[2] < 1e-4 and math.isfinite(worst[0])


def test_dopri5_integrates_backwards_and_counts_evaluations(gm):
    """Reverse direction (data -> noise) inverts the forward solve; NFE is counted by the sampler."""
    tr = build_transport(TransportConfig())
    field = gm.model_fn(tr.path, "velocity")
    f = lambda t, x: tr.velocity(field, x, t)
    x0 = _noise(16, seed=6)
    x1 = dopri5_per_sample(f, x0, 0.0, 1.0, atol=1e-9, rtol=1e-9)
    back = dopri5_per_sample(f, x1, 1.0, 0.0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(back, x0, atol=1e-6, rtol=0)
    out = build_sampler(tr, SamplerConfig(solver="dopri5", atol=1e-4, rtol=1e-4)).sample(field, x0)
    assert 8 <= out.nfe < 500
