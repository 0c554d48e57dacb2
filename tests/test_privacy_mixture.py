"""SFBD's deconvolution where the answer is known: a Gaussian mixture, noisy copies at a known s, 5% clean.

The model is the mixture itself (EM fit) denoised with its exact velocity field, so what is checked is the
mechanism (denoise from t* with the current model -> refit on clean ∪ denoised), without network error; the
benchmark (benchmarks/privacy/mixture.py) runs the same check with a trained flow model."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.transport.gaussian_mixture import GaussianMixture

MIXTURE = Path(__file__).resolve().parents[1] / "benchmarks" / "privacy" / "mixture.py"


@pytest.fixture(scope="module")
def mixture():
    spec = importlib.util.spec_from_file_location("bench_privacy_mixture", MIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sfbd_rounds_deconvolve_the_mixture_where_noisy_only_keeps_the_noise(mixture):
    truth = GaussianMixture.default_2d()
    clean, noisy = mixture.make_data(truth, 2000, 0.05, 0.59, seed=0)

    def errors(x):
        return mixture.mixture_errors(mixture.fit_mixture(x, 3, seed=0, inits=1), truth)

    noisy_only = errors(noisy)
    one_round = errors(mixture.sfbd_exact(clean, noisy, 0.59, rounds=1, seed=0))
    rounds = errors(mixture.sfbd_exact(clean, noisy, 0.59, rounds=8, seed=0))
    # Gaussian noise keeps weights and means; the noisy law's covariances carry + s^2 = 0.35 on the diagonal
    assert noisy_only["covs_err"] > 0.3
    # the rounds contract the covariances onto the truth (rate s^2 / (v + s^2) per round for one Gaussian)
    assert rounds["covs_err"] < 0.08 < one_round["covs_err"]
    assert rounds["weights_err"] < 0.05 and rounds["means_err"] < 0.12


def test_mixture_check_refuses_settings_it_cannot_run(mixture, capsys):
    assert mixture.main(["--clean-fraction", "0"]) == 2
    assert mixture.main(["--steps", "50", "--chunks", "10", "--redenoise", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--clean-fraction=0.0" in err[0] and "do not fit in --steps=50" in err[1]
