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


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_flowrail_sweep_console_is_a_trial_table(digits_shards, tmp_path):
    import yaml

    sweep = {
        "name": "console",
        "overrides": {
            "run_dir": str(tmp_path / "runs"), "data.shards": str(digits_shards / "train"),
            "data.val_shards": str(digits_shards / "val"), "data.image_size": 8, "data.batch_size": 32,
            "model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2, "train.num_workers": 1,
            "train.cpus_per_worker": 0.5, "train.steps": 10, "train.log_every": 5, "train.checkpoint_every": 5,
            "train.keep_checkpoints": 1, "sampler.steps": 2, "samples.per_class": 1,
        },
        "space": {"transport.path": {"grid": ["linear", "gvp"]}},
        "tune": {"metric": "fd_pixels", "mode": "min", "max_concurrent": 1, "asha": {"enabled": False}},
        "eval": {"metrics": ["fd_pixels"], "num_samples": 16},
        "sampling": {"top_k": 1, "num_samples": 0},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    rc, out, err = _cli(["sweep", str(tmp_path / "sweep.yaml")], timeout=1500)
    console = out + err
    assert rc == 0, console[-3000:]
    lines = [ln.rstrip() for ln in re.split(r"[\r\n]", err)]
    header = [i for i, ln in enumerate(lines) if ln.split() == ["trial", "config", "state", "iter", "step",
                                                                  "fd_pixels", "best", "fd_pixels"]]
    assert len(header) >= 3, err[-3000:]  # redrawn as the trials' states change (not a terminal: reprinted)
    final = lines[header[-1] + 1:header[-1] + 3]
    row = re.compile(r"^([* ])\w+_\d{5}\s+transport\.path=(linear|gvp)\s+TERMINATED\s+2\s+10\s+(\d+\.?\d*)\s+"
                     r"(\d+\.?\d*)$")
    matched = [row.match(ln) for ln in final]
    assert all(matched), final
    assert {m.group(2) for m in matched} == {"linear", "gvp"} and sum(m.group(1) == "*" for m in matched) == 1
    starred = next(m for m in matched if m.group(1) == "*")
    assert float(starred.group(4)) == min(float(m.group(4)) for m in matched)
    # none of Tune's reporter output (status pages, per-trial result boxes), nor Ray's per-report/per-dataset lines
    for dump in ("Trial status:", "started with configuration", "finished iteration", "completed after",
                 "Configuration for experiment", "View detailed results", "Wrote the latest version",
                 "Reporting training result", "Execution plan", "Started a local Ray instance",
                 "MLflow database tables"):
        assert dump not in console, dump
    assert "╭" not in console and "│" not in console
    assert "[flowrail] sweep done" in out
