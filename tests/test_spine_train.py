"""End to end on real components: Ray Data shards → Ray Train (2 workers) → DeepSpeed ZeRO → checkpoints → MLflow."""
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import tiny_train_overrides
from pipeline.config import TrainJobConfig, load_config
from pipeline.train.checkpoint import load_trained, read_meta


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_zero2_two_workers_trains_and_logs(trained_digits):
    cfg, result = trained_digits
    losses = _history(result.tracking_uri, result.run_id, "loss")
    assert [s for s, _ in losses] == [5, 10, 15, 20, 25, 30]
    assert losses[-1][1] < 0.8 * losses[0][1], losses
    # the EMA is evaluated in training every train.eval_every steps with the `flowrail evaluate` code
    fd = _history(result.tracking_uri, result.run_id, "fd_digits")
    assert [s for s, _ in fd] == [15, 30] and all(v > 0 for _, v in fd)
    assert {s for s, _ in _history(result.tracking_uri, result.run_id, "classifier_accuracy")} == {15, 30}
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["train.num_workers"] == "2"
    assert run.data.params["model.hidden_size"] == "32" and run.info.status == "FINISHED"
    artifacts = {a.path for d in ("samples", "curves")
                 for a in MlflowClient(result.tracking_uri).list_artifacts(result.run_id, d)}
    assert any(p.startswith("samples/") and p.endswith(".png") for p in artifacts)
    assert "curves/curves.png" in artifacts
    meta = read_meta(result.checkpoint)
    assert meta["step"] == 30 and meta["mlflow_run_id"] == result.run_id
    # both ranks' ZeRO optimizer shards are in the merged checkpoint
    shards = list(Path(result.checkpoint).rglob("*optim_states.pt"))
    assert len(shards) == 2, shards


def test_resume_continues_step_count_in_same_mlflow_run(trained_digits):
    from pipeline.train.trainer import fit

    cfg, first = trained_digits
    longer = cfg.model_copy(deep=True)
    longer.train.steps = 40
    second = fit(longer, make_grid=False)
    assert second.run_id == first.run_id
    steps = [s for s, _ in _history(second.tracking_uri, second.run_id, "loss")]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]  # nothing before step 30 repeated
    assert read_meta(second.checkpoint)["step"] == 40


def test_zero3_two_workers_through_cli(ray_local, digits_shards, tmp_path):
    from jobs.cli import main

    overrides = tiny_train_overrides(digits_shards, tmp_path, run_name="z3", **{"train.zero_stage": 3,
                                                                             "train.steps": 20})
    assert main(["train", *overrides]) == 0
    cfg = load_config(TrainJobConfig, "train", overrides)
    from pipeline.tracking import run_record
    import json

    run_id = json.loads(run_record(cfg).read_text())["run_id"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    losses = _history(uri, run_id, "loss")
    assert losses[-1][1] < losses[0][1]
    trained = load_trained(tmp_path / "ray" / "z3")
    assert trained.step == 20 and trained.image_shape == (1, 8, 8)
    assert len(list((tmp_path / "ray" / "z3").rglob("*optim_states.pt"))) >= 2
