"""Fault tolerance on real Ray Train + DeepSpeed runs: a SIGKILLed worker resumes from the last checkpoint and ends
with the same weights as an uninterrupted run; NaN losses are skipped and counted, too many abort the run."""
from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from cli_output import flowrail_lines
from conftest import tiny_train_overrides
from pipeline.config import TrainJobConfig, load_config
from pipeline.train.checkpoint import EMA_FILE, read_meta


def _steps(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_sigkilled_worker_resumes_and_matches_uninterrupted_run(trained_digits, digits_shards, tmp_path,
                                                                monkeypatch):
    from pipeline.train.trainer import fit

    base_cfg, baseline = trained_digits  # 30 steps, checkpoints (and in-run evaluations) at 15 and 30
    monkeypatch.setenv("FLOWRAIL_FAULT_INJECT", "kill@1:17")  # rank 1 SIGKILLs itself right after step 17
    cfg = load_config(TrainJobConfig, "train", tiny_train_overrides(
        digits_shards, tmp_path, run_name="killed", **{"train.max_failures": 1, "train.eval_every": 15}))
    same = cfg.model_copy(deep=True)
    same.run_name, same.run_dir = base_cfg.run_name, base_cfg.run_dir
    same.train.max_failures = base_cfg.train.max_failures
    assert same == base_cfg  # identical training settings and seed
    result = fit(cfg, make_grid=False)

    marker = tmp_path / "faults" / "killed" / ".fault-kill-r1-s17"
    assert marker.is_file(), "the worker was not killed"
    # the same MLflow run goes on; the restarted group resumed from step 15 and repeated nothing before it
    assert _steps(result.tracking_uri, result.run_id, "resumed_from_step") == [(15, 15.0)]
    assert [s for s, _ in _steps(result.tracking_uri, result.run_id, "loss")] == [5, 10, 15, 20, 25, 30]
    assert MlflowClient(result.tracking_uri).get_run(result.run_id).info.status == "FINISHED"
    meta = read_meta(result.checkpoint)
    assert meta["step"] == 30 and meta["mlflow_run_id"] == result.run_id
    assert (meta["epoch"], meta["batch_in_epoch"]) == (read_meta(baseline.checkpoint)["epoch"],
                                                       read_meta(baseline.checkpoint)["batch_in_epoch"])
    # final weights equal those of the uninterrupted run with the same seed
    ours, theirs = load_file(str(result.checkpoint / EMA_FILE)), load_file(str(baseline.checkpoint / EMA_FILE))
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_nan_losses_skipped_counted_then_abort(ray_local, digits_shards, tmp_path, monkeypatch, capsys):
    from jobs.cli import main

    # batches 2 and 3 of rank 0 give a NaN loss: both ranks skip them together; a third bad step aborts
    monkeypatch.setenv("FLOWRAIL_FAULT_INJECT", "nan@0:2,nan@1:3,nan@0:6")
    overrides = tiny_train_overrides(digits_shards, tmp_path, run_name="nan", **{
        "train.steps": 8, "train.log_every": 2, "train.checkpoint_every": 4, "train.max_bad_steps": 2,
        "train.max_failures": 1})  # one restart shows the recorded error is re-raised at once
    assert main(["train", *overrides]) == 2
    # Ray's own logging also reaches stderr in-process; the CLI's message is the one "flowrail train:" line
    err = flowrail_lines(capsys.readouterr().err, "flowrail train:")
    assert len(err) == 1 and "loss was NaN/Inf in 3 steps (train.max_bad_steps=2)" in err[0], err
    cfg = load_config(TrainJobConfig, "train", overrides)
    from pipeline.tracking import run_record

    run_id = json.loads(run_record(cfg).read_text())["run_id"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bad = _steps(uri, run_id, "bad_steps")
    assert bad and bad[-1][1] == 2.0, bad  # counted and logged before the abort
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"
    # the skipped steps did not advance the step count: the last checkpoint is at step 4, after 6 batches
    from pipeline.train.checkpoint import find_latest

    meta = read_meta(find_latest(tmp_path / "ray" / "nan"))
    assert (meta["step"], meta["bad_steps"], meta["batch_in_epoch"]) == (4, 2, 6)
    assert torch.isfinite(torch.stack([v.float().sum() for v in load_file(
        str(find_latest(tmp_path / "ray" / "nan") / EMA_FILE)).values()])).all()
