"""End to end: a sweep tracked at a credentialed MLflow URI is killed after its first trial finishes, resumed with
``flowrail sweep --resume NAME``, ends with all trials (the finished one run once, ranked by its final checkpoint
although Tune's saved state never saw that result), and the password appears in no
file it wrote (checkpoints, Tune's experiment, sweep state, summary, best config), no MLflow artifact, param or tag,
and no printed line. The console both sweeps printed is flowrail's trial table (redrawn as states change, the best
starred), not Tune's reporter output nor Ray's per-report and per-dataset lines."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

PASSWORD = "Pw-9f3kZq-never-print-me"


def _config(tmp_path: Path, shards: Path) -> Path:
    cfg = {
        "name": "resumable",
        "base": "train",
        "overrides": {
            "run_dir": str(tmp_path / "runs"), "data.shards": str(shards / "train"),
            "data.val_shards": str(shards / "val"), "data.image_size": 8, "data.batch_size": 32,
            "model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2, "train.num_workers": 1,
            "train.cpus_per_worker": 0.5, "train.steps": 20, "train.log_every": 5, "train.checkpoint_every": 10,
            "train.keep_checkpoints": 1, "train.lr": 3e-3, "sampler.steps": 4, "samples.per_class": 1,
            "tracking.experiment": "sweep-resume",
        },
        "space": {"transport.path": {"grid": ["linear", "gvp"]}},
        "tune": {"metric": "fd_pixels", "mode": "min", "max_concurrent": 1, "asha": {"enabled": False}},
        "eval": {"metrics": ["fd_pixels"], "num_samples": 32},
        "sampling": {"top_k": 1, "num_samples": 1, "configs": [{"name": "heun2", "sampler": {"solver": "heun", "steps": 2}}],
                     "space": {"sampler.steps": {"randint": [2, 5]}}},
        "registry": {"enabled": True, "name": "flowrail-resume"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.slow
@pytest.mark.timeout(2400)  # two sweep processes, each starting its own local Ray
def test_killed_sweep_resumes_and_never_leaks_the_tracking_password(digits_shards, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    secret_uri = mlflow_server.replace("http://", f"http://flowrail:{PASSWORD}@")
    env = {**os.environ, "MLFLOW_TRACKING_URI": secret_uri, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    cfg = _config(tmp_path, digits_shards)
    c = MlflowClient(mlflow_server)

    # Tune writes its experiment state at most every 10 s (and less often for large sweeps): here only when the sweep
    # starts, so the resumed sweep deterministically finds the trial that had finished as never having reported
    first = _spawn(["sweep", str(cfg)], {**env, "TUNE_GLOBAL_CHECKPOINT_S": "3600"}, tmp_path / "first.log")
    deadline = time.time() + 900
    finished = []
    while time.time() < deadline and first.poll() is None:
        exp = c.get_experiment_by_name("sweep-resume")
        if exp is not None:
            finished = c.search_runs([exp.experiment_id], "tags.`flowrail.job` = 'sweep_trial' and "
                                                          "attributes.status = 'FINISHED'")
            if finished:
                break
        time.sleep(2)
    assert finished, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # the driver, its local Ray and the running second trial
    first.wait()
    done_run = finished[0].info.run_id
    time.sleep(5)

    second = _spawn(["sweep", "--resume", "resumable", "--run-dir", str(tmp_path / "runs")], env,
                    tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    _assert_trial_table_console((tmp_path / "first.log").read_text(), (tmp_path / "second.log").read_text())

    exp = c.get_experiment_by_name("sweep-resume")
    trials = c.search_runs([exp.experiment_id], "tags.`flowrail.job` = 'sweep_trial'")
    assert sorted(t.data.params["transport.path"] for t in trials) == ["gvp", "linear"]  # one run per trial
    assert all(t.info.status == "FINISHED" for t in trials)
    history = [m.step for m in c.get_metric_history(done_run, "loss")]
    assert len(history) == len(set(history)) == 4, history  # steps 5..20 logged once: it did not train again
    parents = c.search_runs([exp.experiment_id], "tags.`flowrail.job` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert c.get_model_version_by_alias("flowrail-resume", "champion")
    assert (tmp_path / "runs" / "sweeps" / "resumable" / "best_config.yaml").is_file()

    # the password: in no file, artifact, param, tag or printed line
    hits = [str(p) for p in tmp_path.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert not hits, hits
    downloaded = tmp_path.parent / f"{tmp_path.name}-artifacts"
    for run in c.search_runs([exp.experiment_id]):
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert PASSWORD not in value, (run.info.run_id, key)
        if c.list_artifacts(run.info.run_id):
            target = downloaded / run.info.run_id
            target.mkdir(parents=True)
            c.download_artifacts(run.info.run_id, "", str(target))
    hits = [str(p) for p in downloaded.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert not hits, hits
    for version in c.search_model_versions("name='flowrail-resume'"):
        assert all(PASSWORD not in str(v) for v in version.tags.values()) and PASSWORD not in (version.description or "")


TABLE_HEADER = ["trial", "config", "state", "iter", "step", "fd_pixels", "best", "fd_pixels"]
TUNE_AND_RAY_DUMPS = ("Trial status:", "started with configuration", "finished iteration", "completed after",
                      "Configuration for experiment", "View detailed results", "Wrote the latest version",
                      "Reporting training result", "Execution plan", "Started a local Ray instance",
                      "MLflow database tables")


def _assert_trial_table_console(first: str, second: str) -> None:
    """Both sweeps' consoles (not a terminal, so each redraw is reprinted): the trial table, redrawn as trial states
    change; the resumed sweep's last table has both trials TERMINATED at step 20, the lower fd starred."""
    # the first sweep is killed at an arbitrary point of its second trial's start (as soon as the test sees the first
    # trial's MLflow run FINISHED, maybe before Tune has marked that trial TERMINATED and redrawn): one table at least
    for console, tables in ((first, 1), (second, 2)):
        assert sum(ln.split() == TABLE_HEADER for ln in re.split(r"[\r\n]", console)) >= tables, console[-3000:]
        for dump in TUNE_AND_RAY_DUMPS:
            assert dump not in console, dump
        assert "╭" not in console and "│" not in console
    lines = [ln.rstrip() for ln in re.split(r"[\r\n]", second)]
    last = max(i for i, ln in enumerate(lines) if ln.split() == TABLE_HEADER)
    row = re.compile(r"^([* ])\w+_\d{5}\s+transport\.path=(linear|gvp)\s+TERMINATED\s+\d+\s+20\s+(\d+\.?\d*)\s+"
                     r"(\d+\.?\d*)$")
    matched = [row.match(ln) for ln in lines[last + 1:last + 3]]
    assert all(matched), lines[last:last + 3]
    assert {m.group(2) for m in matched} == {"linear", "gvp"} and sum(m.group(1) == "*" for m in matched) == 1
    starred = next(m for m in matched if m.group(1) == "*")
    assert float(starred.group(4)) == min(float(m.group(4)) for m in matched)
    assert "[flowrail] sweep done" in second
