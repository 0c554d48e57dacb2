"""The driver dies mid-run (SIGKILL, as when a head pod is lost): re-running the same command picks the run up from
its last checkpoint, ends with the same weights as an uninterrupted run, and finishes the same MLflow run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import tiny_train_overrides
from pipeline.train.checkpoint import EMA_FILE, read_meta

REPO = Path(__file__).resolve().parents[1]


def _train(overrides: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``flowrail train`` in its own process group (its local Ray too), which is SIGKILLed after it ends."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "train", *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        try:  # whatever the killed driver's Ray left behind in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the baseline fixture plus two training runs: over 600 s on a loaded 2-core machine
def test_driver_sigkill_then_rerun_matches_uninterrupted_run(trained_digits, digits_shards, tmp_path):
    base_cfg, baseline = trained_digits  # 30 steps, checkpoints at 15 and 30
    overrides = tiny_train_overrides(digits_shards, tmp_path, run_name="driverkill", **{"train.eval_every": 15})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)  # its own local Ray; MLflow in run_dir's sqlite
    killed = _train(overrides, {**env, "FLOWRAIL_FAULT_INJECT": "killdriver@0:17"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert (tmp_path / "faults" / "driverkill" / ".fault-killdriver-r0-s17").is_file()

    rerun = _train(overrides, env)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "(resumed)" in rerun.stdout and "resumed from step 15" in rerun.stdout, rerun.stdout[-3000:]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("flowrail").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]
    steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")})
    assert steps == [5, 10, 15, 20, 25, 30], steps

    from pipeline.train.checkpoint import find_latest

    final = find_latest(tmp_path / "ray" / "driverkill")
    assert read_meta(final)["step"] == 30 and read_meta(final)["mlflow_run_id"] == runs[0].info.run_id
    ours, theirs = load_file(str(final / EMA_FILE)), load_file(str(baseline.checkpoint / EMA_FILE))
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst < 1e-5, worst
