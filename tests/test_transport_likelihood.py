"""NLL in bits/dim and reverse-ODE reconstruction: Hutchinson by default (exact for small data), agreement with
the exact log-density of a Gaussian mixture, and the ``bpd`` / ``reconstruction_mse`` evaluation metrics."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import TransportConfig
from pipeline.transport import build_transport, nll
from pipeline.transport.gaussian_mixture import GaussianMixture
from pipeline.transport.likelihood import EXACT_MAX_DIM, reconstruction_error


def test_hutchinson_is_the_default_above_small_data_and_unbiased():
    """On a linear field v = A x the exact divergence is tr(A); a 100-dim sample uses Hutchinson by default,
    whose per-sample estimate e^T A e averages to tr(A) over samples."""
    tr = build_transport(TransportConfig())
    a = torch.randn(100, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.1
    field = lambda x, t: x @ a.T  # noqa: E731
    x1 = torch.randn(400, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = nll(tr, field, x1[:8], exact_divergence=True, method="euler", steps=4)
    assert 100 > EXACT_MAX_DIM
    default = nll(tr, field, x1, method="euler", steps=4, generator=torch.Generator().manual_seed(2))
    hutch_again = nll(tr, field, x1[:8], method="euler", steps=4, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(hutch_again.nats_per_dim, exact.nats_per_dim)  # really an estimate per sample
    # the estimator's mean over samples matches the exact NLL's mean on the same data (linear field: exact there)
    exact_all = nll(tr, field, x1[:64], exact_divergence=True, method="euler", steps=4)
    diff = float(default.nats_per_dim[:64].mean() - exact_all.nats_per_dim.mean())
    assert abs(diff) < 0.02, diff


def test_nll_bits_per_dim_matches_the_exact_log_density():
    gm = GaussianMixture.default_2d()
    tr = build_transport(TransportConfig())
    x1 = gm.sample(256, torch.Generator().manual_seed(0))
    out = nll(tr, gm.model_fn(tr.path, "velocity"), x1)  # 2 dims: exact divergence by default
    truth = -gm.log_prob(x1) / (2 * math.log(2))
    assert float((out.bits_per_dim - truth).abs().max()) < 2e-3


def test_reconstruction_round_trip_is_small_and_counts_nfe():
    gm = GaussianMixture.default_2d()
    tr = build_transport(TransportConfig())
    x1 = gm.sample(64, torch.Generator().manual_seed(1))
    tight = reconstruction_error(tr, gm.model_fn(tr.path, "velocity"), x1, atol=1e-8, rtol=1e-8)
    loose = reconstruction_error(tr, gm.model_fn(tr.path, "velocity"), x1, solver="euler", steps=4)
    assert float(tight.mse.max()) < 1e-8 < float(loose.mse.mean())
    assert loose.nfe == 8 and tight.nfe > 12


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("likelihood-cache"))


def test_bpd_and_reconstruction_metrics_on_digits(digits_shards, cache_dir):
    """``eval.metrics=[bpd, reconstruction_mse]`` on real digits shards with a tiny SiT; FLUX/DFM refused."""
    from evals.likelihood import likelihood_metrics
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.data.streaming import DataInfo
    from pipeline.models import build_model
    from pipeline.objective import build_objective
    from pipeline.train.checkpoint import Trained

    cfg = load_config(TrainJobConfig, None, [
        f"data.shards={digits_shards / 'train'}", f"data.val_shards={digits_shards / 'val'}", "data.image_size=8",
        "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "eval.bpd_samples=6", "eval.batch_size=4",
        "sampler.solver=heun", "sampler.steps=8", "eval.metrics=[bpd,reconstruction_mse]"])
    info = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=100)
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, input_size=8, num_classes=10, flux_cfg=cfg.flux).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the zero-initialised output: a non-trivial field
            p.add_(0.05 * torch.randn_like(p))
    trained = Trained(config=cfg, model=model, objective=build_objective(cfg, 10), data=info, step=0, path=None)
    metrics = likelihood_metrics(trained, cfg, list(cfg.eval.metrics))
    assert metrics["likelihood_samples"] == 6
    assert math.isfinite(metrics["bpd"]) and metrics["bpd"] > 0
    assert 0 <= metrics["reconstruction_mse"] < 1e-2  # heun, 8 steps each way, on a smooth field

    from evals.likelihood import check_applicable

    dfm = Trained(config=cfg, model=model, objective=object(), data=info, step=0, path=None)
    with pytest.raises(ValueError, match="eval.metrics=bpd is not available"):
        check_applicable(dfm, ["fid", "bpd"])
