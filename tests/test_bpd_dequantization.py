"""bits/dim of 8-bit pixel data: uniform dequantization on the grid, checked against closed forms on a Gaussian."""
from __future__ import annotations

import math

import torch

from evals.likelihood import dequantized_bits_per_dim
from pipeline.config import TransportConfig
from pipeline.transport import build_transport
from pipeline.transport.gaussian_mixture import GaussianMixture

LEVELS, DELTA, D = 256, 2.0 / 255, 4


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def test_dequantized_bpd_matches_the_gaussian_closed_forms_and_bounds_the_discrete_nll():
    """Data: a narrow Gaussian N(m, s^2 I) (m on the grid, s = Delta / 4) rounded to the 8-bit grid, and the exact velocity field of
    N(m, s^2 I). (1) Per sample, the bits equal -log2 N(y; m, s^2) / D - log2 Delta at the dequantized point y.
    (2) Their mean matches the expectation over u in closed form,
    1/2 log(2 pi s^2) + ((x - m)^2 + Delta^2 / 12) / (2 s^2) nats/dim. (3) They bound the exact discrete NLL
    -log2 prod (Phi((x - m + Delta/2) / s) - Phi((x - m - Delta/2) / s)) / D from above (without dequantization the
    density at the grid points gives a number below it: not a bound)."""
    s, m = DELTA / 4, torch.full((D,), -1 + 128 * DELTA, dtype=torch.float64)
    gm = GaussianMixture(m[None], (s**2 * torch.eye(D, dtype=torch.float64))[None])
    tr = build_transport(TransportConfig())
    field = gm.model_fn(tr.path, "velocity")
    x = torch.round((gm.sample(256, torch.Generator().manual_seed(0)) + 1) * 127.5) / 127.5 - 1  # on the grid
    bits = dequantized_bits_per_dim(tr, field, x, LEVELS, torch.Generator().manual_seed(1), atol=1e-8, rtol=1e-8)
    # (1) the same dequantization noise, reproduced: the ODE's NLL is the exact Gaussian density at y
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = x + DELTA * (u - 0.5)
    at_y = (0.5 * math.log(2 * math.pi * s**2) + (y - m).pow(2) / (2 * s**2)).sum(1) / (D * math.log(2))
    assert float((bits - (at_y - math.log2(DELTA))).abs().max()) < 1e-3
    # (2) the expectation over the dequantization noise, in closed form
    expected = ((0.5 * math.log(2 * math.pi * s**2) + ((x - m).pow(2) + DELTA**2 / 12) / (2 * s**2)).sum(1)
                / (D * math.log(2)) - math.log2(DELTA))
    assert abs(float(bits.mean() - expected.mean())) < 0.08, (float(bits.mean()), float(expected.mean()))
    # (3) an upper bound on the discrete NLL (in expectation over u; exactly so for the closed form)
    cell = _normal_cdf((x - m + DELTA / 2) / s) - _normal_cdf((x - m - DELTA / 2) / s)
    discrete = -torch.log2(cell).sum(1) / D
    assert float(expected.mean()) >= float(discrete.mean()) and float(bits.mean()) >= float(discrete.mean()) - 0.05
    undequantized = ((0.5 * math.log(2 * math.pi * s**2) + (x - m).pow(2) / (2 * s**2)).sum(1) / (D * math.log(2))
                     - math.log2(DELTA))
    assert float(undequantized.mean()) < float(discrete.mean())  # why the noise is needed
