"""The console of jobs that are not a training run: ``flowrail evaluate`` (one bar over the samples, saying what it
is doing; Ray's and MLflow's INFO lines off; a metrics table at the end) and ``flowrail sweep`` (a trial table
updated in place instead of Tune's per-trial output; the table a real sweep prints is checked end to end in
``test_sweep_resume.py``)."""
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
    tune = logging.getLogger("ray.tune.tune")  # "Wrote the latest version of all result files ..."
    try:
        quiet_driver_logs()
        assert not any(lg.isEnabledFor(logging.INFO) for lg in (ray_start, mlflow_store, tune))
        assert all(lg.isEnabledFor(logging.WARNING) for lg in (ray_start, mlflow_store, tune))
    finally:
        restore_ray_logs()
    assert all(lg.isEnabledFor(logging.INFO) for lg in (ray_start, mlflow_store, tune))


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


def test_trial_table_stars_the_best_and_redraws_in_place():
    import io

    from pipeline.sweep.console import LiveBlock, TrialRow, render

    rows = [TrialRow("a_00000", "transport.path=linear", "TERMINATED", 2, 10, 41.5, 40.25),
            TrialRow("a_00001", "transport.path=gvp", "RUNNING", 1, 5, 38.0, 38.0),
            TrialRow("a_00002", "transport.path=sbdm")]
    lines = render(rows, "fd_pixels", "min")
    assert lines[0].split() == ["trial", "config", "state", "iter", "step", "fd_pixels", "best", "fd_pixels"]
    assert lines[2].startswith("*a_00001") and lines[1].startswith(" a_00000") and lines[3].split()[-2:] == ["PENDING", "0"]
    assert render(rows, "accuracy", "max")[1].startswith("*a_00000")  # mode max: the largest best value leads
    out = io.StringIO()
    live = LiveBlock(out, in_place=True)
    live.show(lines)
    live.show(lines)  # unchanged: nothing written
    live.show(lines[:2])
    assert out.getvalue() == "\n".join(lines) + "\n" + "\x1b[4F\x1b[J" + "\n".join(lines[:2]) + "\n"
    log = io.StringIO()
    LiveBlock(log, in_place=False).show(lines)
    assert "\x1b" not in log.getvalue()


def test_a_resumed_sweep_shows_what_restored_trials_reported(monkeypatch: pytest.MonkeyPatch):
    """A trial finished before the kill comes back from Tune's experiment state with its last result and its
    per-trial metric summary; its row shows them (not ``TERMINATED 0`` with no value), so the star stays right."""
    import io
    from types import SimpleNamespace

    from pipeline.sweep.console import TrialTable

    done = SimpleNamespace(trial_id="a_00000", config={"transport.path": "linear"}, status="TERMINATED",
                           run_metadata=SimpleNamespace(
                               last_result={"training_iteration": 2, "step": 20, "fd_pixels": 31.0},
                               metric_analysis={"fd_pixels": {"min": 30.5, "max": 31.0, "last": 31.0}}))
    running = SimpleNamespace(trial_id="a_00001", config={"transport.path": "gvp"}, status="RUNNING",
                              run_metadata=SimpleNamespace(last_result={}, metric_analysis={}))
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    table = TrialTable("fd_pixels", "min")
    table.on_trial_result(0, [done, running], running, {"training_iteration": 1, "step": 10, "fd_pixels": 33.0})
    lines = err.getvalue().splitlines()
    assert lines[1].split() == ["*a_00000", "transport.path=linear", "TERMINATED", "2", "20", "31", "30.5"]
    assert lines[2].split() == ["a_00001", "transport.path=gvp", "RUNNING", "1", "10", "33", "33"]
