"""The run's checkpoint storage fills up during a real 2-worker run: one line naming the storage and the step
(exit 2), the previous checkpoint is kept and stays the latest, the MLflow run is FAILED, and Ray Train's restarts
(``train.max_failures``; one here, to keep the test short) do not repeat the work. A real full filesystem: a tmpfs sized for a checkpoint
and a half (mounting needs root; skipped otherwise)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cli_output import flowrail_lines
from conftest import tiny_train_overrides


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the baseline fixture plus a run and its restarts: over 600 s on a loaded machine
def test_storage_full_at_checkpoint_keeps_the_previous_one(trained_digits, digits_shards, tmp_path, capsys):
    from jobs.cli import main
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.tracking import run_record
    from pipeline.train.checkpoint import find_latest, read_meta

    _, baseline = trained_digits  # same model and world size: its checkpoint is the size ours will be
    size = _du(baseline.checkpoint)
    disk = tmp_path / "storage"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) // 4096 * 4096 + 4096}",
                              "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        overrides = tiny_train_overrides(digits_shards, tmp_path, run_name="full", **{
            "train.storage_path": str(disk), "train.steps": 30, "train.checkpoint_every": 15,
            "train.max_failures": 1})
        assert main(["train", *overrides]) == 2
        err = flowrail_lines(capsys.readouterr().err, "flowrail train:")
        assert len(err) == 1, err
        assert f"could not store the checkpoint of step 30 in {disk}/full: no space left on device" in err[0], err
        assert read_meta(find_latest(disk / "full"))["step"] == 15  # the previous checkpoint is kept, still latest
        cfg = load_config(TrainJobConfig, "train", overrides)
        run_id = json.loads(run_record(cfg).read_text())["run_id"]
        assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).info.status == "FAILED"
        marker = json.loads((run_record(cfg).parent / "user_error.json").read_text())
        assert marker["name"] == "CheckpointError"  # what the restarted worker groups re-raised at once
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
