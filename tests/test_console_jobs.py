"""The console of jobs that are not a training run: ``flowrail evaluate`` (one bar over the samples, saying what it
is doing; Ray's and MLflow's INFO lines off; a metrics table at the end) and ``flowrail sweep`` (a trial table
updated in place instead of Tune's per-trial output)."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str], timeout: int = 900) -> tuple[int, str, str]:
    """``flowrail ARGS`` in a fresh process (its own local Ray) with the console a person would see."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "FLOWRAIL_VERBOSE")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_quiet_driver_logs_hides_info_keeps_warnings_and_verbose_restores():
    from pipeline.console import quiet_driver_logs, restore_ray_logs

    ray_start = logging.getLogger("ray._private.worker")  # "Started a local Ray instance. View the dashboard ..."
    mlflow_store = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables..."
    try:
        quiet_driver_logs()
        assert not ray_start.isEnabledFor(logging.INFO) and not mlflow_store.isEnabledFor(logging.INFO)
        assert ray_start.isEnabledFor(logging.WARNING) and mlflow_store.isEnabledFor(logging.WARNING)
    finally:
        restore_ray_logs()
    assert ray_start.isEnabledFor(logging.INFO) and mlflow_store.isEnabledFor(logging.INFO)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # includes the shared training fixture when this test is the first to need it
def test_flowrail_evaluate_console_is_a_bar_and_a_table(trained_digits, tmp_path):
    _, result = trained_digits
    rc, out, err = _cli(["evaluate", str(result.checkpoint), f"run_dir={tmp_path}", "eval.num_samples=60",
                         "eval.batch_size=16", "eval.num_workers=2", f"eval.cache_dir={tmp_path / 'cache'}",
                         "sampler.steps=4"])
    console = out + err
    assert rc == 0, console[-3000:]
    # Ray's start-up line and MLflow's store set-up are INFO chatter: gone
    assert "Started a local Ray instance" not in console and "View the dashboard" not in console
    assert "MLflow database tables" not in console and "INFO mlflow" not in console
    # one bar over the samples (tqdm redraws it with carriage returns), fed by both Ray workers, saying what it does
    frames = [f for f in re.split(r"[\r\n]", err) if f.startswith("evaluate:")]
    assert any(re.search(r"\| \d+/60 samples \[.*sampling batch \d/\d\]", f) for f in frames), frames[:8]
    assert any(re.search(r"\| \d+/60 samples \[.*features of batch \d/\d\]", f) for f in frames), frames[:8]
    assert any(re.search(r"100%\|.*\| 60/60 samples", f) for f in frames), frames[-3:]
    assert any(re.search(r"\| (1[0-9]|[2-5][0-9])/60 samples", f) for f in frames), frames  # it moved, not just ended
    # the result: a table, one metric per row
    assert re.search(r"^\s+metric\s+value$", out, re.M), out
    for name in ("fd_digits", "precision", "recall", "classifier_accuracy", "nfe"):
        assert re.search(rf"^\s+{name}\s+-?\d", out, re.M), out
    assert re.search(r"^\s+eval_samples\s+60$", out, re.M), out

