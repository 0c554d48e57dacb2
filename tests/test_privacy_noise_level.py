"""t* maps a release noise level s to the interpolant time where sigma/alpha == s, for every path."""
from __future__ import annotations

import math

import pytest

from privacy.noise_level import linear_time_for_noise_level, time_for_noise_level


def _vp_alpha(t, bmin=0.1, bmax=20.0):
    return math.exp(-0.25 * (1 - t) ** 2 * (bmax - bmin) - 0.5 * (1 - t) * bmin)


PATHS = {
    "linear": (lambda t: t, lambda t: 1 - t),
    "gvp": (lambda t: math.sin(math.pi * t / 2), lambda t: math.cos(math.pi * t / 2)),
    "vp": (_vp_alpha, lambda t: math.sqrt(1 - _vp_alpha(t) ** 2)),
    "polynomial": (lambda t: t ** 2, lambda t: 1 - t),
    "linear_vp": (lambda t: t, lambda t: math.sqrt(1 - t * t)),
}


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("s", [0.05, 0.59, 1.38, 5.0])
def test_sigma_over_alpha_equals_s(name, s):
    alpha, sigma = PATHS[name]
    t = time_for_noise_level((alpha, sigma), s)
    assert 0 < t < 1
    assert sigma(t) / alpha(t) == pytest.approx(s, rel=1e-9)


def test_linear_closed_form():
    for s in (0.1, 0.59, 1.38):
        assert time_for_noise_level(PATHS["linear"], s) == pytest.approx(linear_time_for_noise_level(s), abs=1e-10)
    assert linear_time_for_noise_level(0.59) == pytest.approx(1 / 1.59)


def test_unreachable_or_bad_levels():
    with pytest.raises(ValueError, match="exceeds what this path reaches"):
        time_for_noise_level(PATHS["vp"], 1e4)  # VP's sigma/alpha at t=0 is about 150
    with pytest.raises(ValueError, match="positive finite"):
        time_for_noise_level(PATHS["linear"], -1.0)
