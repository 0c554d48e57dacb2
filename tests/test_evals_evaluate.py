"""Evaluation of trained models (evals/distributed.py, evals/evaluate.py, jobs/evaluate.py)."""
from pathlib import Path

import pytest
import torch

from evals.distributed import plan_slices
from evals.evaluate import evaluate_checkpoint, run_evaluation


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cache (digits classifier) for this module; trained on first use."""
    return str(tmp_path_factory.mktemp("evals-cache"))


def _untrained(cache_dir, *overrides):
    """An untrained tiny SiT on 8x8 digits-shaped data, as a Trained without a checkpoint directory."""
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.data.streaming import DataInfo
    from pipeline.models import build_model
    from pipeline.objective import build_objective
    from pipeline.train.checkpoint import Trained

    cfg = load_config(TrainJobConfig, None, ["model.hidden_size=32", "model.depth=2", "model.num_heads=2",
                                             "sampler.steps=4", "eval.num_samples=40", "samples.per_class=2",
                                             f"eval.cache_dir={cache_dir}", *overrides])
    info = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=100)
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, input_size=8, num_classes=10, flux_cfg=cfg.flux).eval()
    return Trained(config=cfg, model=model, objective=build_objective(cfg, 10), data=info, step=0, path=None), cfg


def test_plan_slices_are_class_balanced_with_distinct_seeds():
    slices = plan_slices(103, 10, 4, seed=7)
    labels = torch.cat([s[0] for s in slices])
    assert len(slices) == 4 and len(labels) == 103
    assert torch.equal(torch.bincount(labels, minlength=10)[:3], torch.tensor([11, 11, 11]))
    assert len({s[1] for s in slices}) == 4
    assert [s[1] for s in plan_slices(103, 10, 4, seed=7)] == [s[1] for s in slices]


def test_evaluate_checkpoint_in_process(cache_dir):
    trained, cfg = _untrained(cache_dir)
    metrics = evaluate_checkpoint(trained, cfg)
    for key in ("fd_digits", "precision", "recall", "classifier_accuracy"):
        assert key in metrics
    assert metrics["fd_digits"] > 20  # an untrained model is far from digits
    assert metrics["nfe"] == 4 and metrics["eval_samples"] == 40
    assert evaluate_checkpoint(trained, cfg)["fd_digits"] == metrics["fd_digits"]  # seeded
    # a sampler override takes effect without retraining
    cfg_sde = cfg.model_copy(deep=True)
    cfg_sde.sampler.method, cfg_sde.sampler.steps, cfg_sde.eval.metrics = "sde", 6, ["fd_digits"]
    sde = run_evaluation(trained, cfg_sde)
    assert set(sde.metrics) == {"fd_digits", "nfe", "eval_samples", "eval_seconds"}
    assert sde.metrics["nfe"] != metrics["nfe"] and sde.metrics["fd_digits"] != metrics["fd_digits"]
    assert sorted(sde.examples) == list(range(10)) and all(len(v) == 2 for v in sde.examples.values())
    cfg.eval.metrics = ["fid_digits"]
    with pytest.raises(ValueError, match="unknown metric 'fid_digits'"):
        evaluate_checkpoint(trained, cfg)


def test_ray_workers_reduce_once_for_an_in_memory_model(ray_local, cache_dir):
    """No checkpoint directory: the model travels through the object store; two workers, one reduction."""
    trained, cfg = _untrained(cache_dir, "eval.num_workers=2", "eval.num_samples=30", "eval.batch_size=8")
    result = run_evaluation(trained, cfg)
    assert result.metrics["eval_samples"] == 30
    assert {"fd_digits", "precision", "recall", "classifier_accuracy"} <= set(result.metrics)
    assert sorted(result.examples) == list(range(10))  # worker slices together cover every class


def test_fid_without_weights_fails_before_sampling(cache_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWRAIL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    trained, cfg = _untrained(cache_dir, "eval.metrics=[fid]")
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        evaluate_checkpoint(trained, cfg)


@pytest.mark.timeout(1800)  # includes the shared training fixture when this test is the first to need it
def test_flowrail_evaluate_logs_to_mlflow(trained_digits, mlflow_server, cache_dir, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.cli import main

    train_cfg, result = trained_digits
    rc = main(["evaluate", str(result.checkpoint), f"tracking.tracking_uri={mlflow_server}",
               "eval.num_samples=60", "eval.num_workers=2", f"eval.cache_dir={cache_dir}",
               "sampler.method=sde", "sampler.diffusion=sigma", "sampler.steps=5", "guidance.scale=1.5"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(train_cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`flowrail.job` = 'evaluate'")
    assert len(runs) == 1
    run = runs[0]
    for key in ("fd_digits", "precision", "recall", "classifier_accuracy", "nfe"):
        assert key in run.data.metrics
    assert run.data.metrics["eval_samples"] == 60
    assert run.data.params["sampler.method"] == "sde" and run.data.params["sampler.steps"] == "5"
    assert run.data.params["guidance.scale"] == "1.5"
    assert run.data.tags["flowrail.source_run_id"] == result.run_id
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert len(grids) == 1 and grids[0].endswith(".png")
    local = Path(client.download_artifacts(run.info.run_id, grids[0]))
    assert local.stat().st_size > 100


@pytest.mark.timeout(1800)
def test_flowrail_evaluate_refuses_training_overrides(trained_digits, capsys):
    from jobs.cli import main

    _, result = trained_digits
    assert main(["evaluate", str(result.checkpoint), "model.depth=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.depth=3" in err and "sampler.*" in err and "\n" not in err
    assert main(["evaluate", str(result.checkpoint), "sampler.method=langevin"]) == 2
    assert "sampler.method" in capsys.readouterr().err
    assert main(["evaluate", "/nonexistent/ckpt"]) == 2
    assert "/nonexistent/ckpt" in capsys.readouterr().err
