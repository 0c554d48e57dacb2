"""Training on the digits shards for every path x prediction pair.

- Every pair: the objective the Ray Train worker builds (``build_objective``) trains a tiny real SiT on a real
  digits batch (read through the spine's Ray Data pipeline) for a few AdamW steps and samples from it.
- ``flowrail train`` end to end (1 worker, 4 steps, one shared Ray), one test per pair: the stiffest pair (VP,
  score) runs in the default tier, the other 14 are marked ``slow`` and ``exhaustive`` (``make test-all``; CI's
  end-to-end tier leaves them out: the objective of every pair is already trained above, and the spine around it is
  the same);
  each run costs ~20 s on an idle 2-core machine, a minute or more on a loaded one.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_train_overrides
from mlflow.tracking import MlflowClient

from pipeline.config import TrainJobConfig, load_config

PATHS = ["linear", "gvp", "vp", "polynomial", "linear_vp"]
PREDICTIONS = ["velocity", "score", "noise"]
PAIRS = [(p, q) for p in PATHS for q in PREDICTIONS]
DEFAULT_E2E = {("vp", "score")}


def _overrides(shards, run_dir, path, prediction, **extra):
    return tiny_train_overrides(shards, run_dir, **{
        "run_name": f"{path}-{prediction}", "transport.path": path, "transport.prediction": prediction,
        "transport.loss_weight": "none" if prediction == "velocity" else "likelihood", **extra})


@pytest.fixture(scope="module")
def digits_batch(ray_local, digits_shards):
    from pipeline.data.streaming import build_dataset

    ds, info = build_dataset(str(digits_shards / "train"), image_size=8)
    batch = ds.take_batch(32, batch_format="numpy")
    return {"image": torch.as_tensor(batch["image"]), "label": torch.as_tensor(batch["label"])}, info


@pytest.mark.parametrize("path,prediction", PAIRS)
def test_objective_trains_sit_on_digits(digits_batch, digits_shards, tmp_path, path, prediction):
    from pipeline.models import build_model
    from pipeline.objective import build_objective

    batch, info = digits_batch
    cfg = load_config(TrainJobConfig, "train", _overrides(digits_shards, tmp_path, path, prediction,
                                                          **{"sampler.method": "sde", "sampler.steps": 3}))
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=info.channels, input_size=info.size, num_classes=info.num_classes)
    objective = build_objective(cfg, info.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = objective.loss(model, batch)
        assert loss.dim() == 0 and math.isfinite(float(loss.detach())), float(loss.detach())
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    model.eval()
    with torch.no_grad():
        out = objective.sample(model, {"label": batch["label"][:4]}, (4, info.channels, info.size, info.size),
                               torch.Generator().manual_seed(0))
    assert out.x.shape == (4, info.channels, info.size, info.size) and bool(torch.isfinite(out.x).all())
    assert out.nfe == 4  # 3 Euler-Maruyama steps + the mean last step


@pytest.mark.parametrize("path,prediction", [pytest.param(p, q, marks=() if (p, q) in DEFAULT_E2E else
                                                          (pytest.mark.slow, pytest.mark.exhaustive))
                                             for p, q in PAIRS])
def test_flowrail_train(ray_local, digits_shards, tmp_path, path, prediction):
    from jobs.cli import main
    from pipeline.tracking import run_record

    overrides = _overrides(digits_shards, tmp_path, path, prediction, **{
        "train.num_workers": 1, "train.steps": 4, "train.log_every": 2, "train.checkpoint_every": 4,
        "sampler.steps": 2, "samples.per_class": 1, "data.batch_size": 16})
    assert main(["train", *overrides]) == 0
    cfg = load_config(TrainJobConfig, "train", overrides)
    run_id = json.loads(run_record(cfg).read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    losses = [m.value for m in client.get_metric_history(run_id, "loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    assert [m.value for m in client.get_metric_history(run_id, "bad_steps")][-1] == 0
    assert [m.value for m in client.get_metric_history(run_id, "sample_nfe")] == [2]  # Euler, 2 steps
