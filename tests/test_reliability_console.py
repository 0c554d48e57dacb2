"""The console of a default 2-worker ``flowrail run``: one progress bar on the driver, none of Ray's per-dataset
execution logs or per-rank report lines; and the run's system metrics (CPU, memory per node) in MLflow."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_flowrail_run_console_is_a_progress_bar_and_system_metrics_are_logged(digits_shards, tmp_path):
    overrides = [f"run_dir={tmp_path}", f"data.shards={digits_shards / 'train'}",
                 f"data.val_shards={digits_shards / 'val'}", "train.steps=20", "train.log_every=5",
                 "train.checkpoint_every=20", "train.eval_every=0", "model.hidden_size=32", "model.depth=2",
                 "samples.per_class=1", "sampler.steps=4", "log.system_metrics_interval_s=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "FLOWRAIL_VERBOSE")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert "Reporting training result" not in console
    assert "Execution plan" not in console and "Starting execution" not in console
    assert "execution finished" not in console and "Progress bars disabled" not in console
    # the driver's bar (tqdm redraws it in place with carriage returns): step, loss, samples/s, data wait, ETA
    frames = [f for f in re.split(r"[\r\n]", console) if f.startswith("digits:")]
    assert any(re.search(r"100%\|.*\| step 20/20 \[\S+<\S+, .*loss=\d\.\d{4}, samples/s=\d+, data wait=\d+%\]", f)
               for f in frames), frames[-5:]
    assert any("step 5/20" in f or "step 10/20" in f for f in frames), frames[:5]  # it moved, not just ended
    # the workers' per-step lines are replaced by the bar
    assert not re.search(r"\[flowrail\] step \d+/20", console)

    run_id = re.search(r"MLflow run id: (\w+)", proc.stdout).group(1)
    metrics = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.metrics
    system = {k for k in metrics if k.startswith("system/")}
    assert {"system/node_0/cpu_utilization_percentage", "system/node_0/system_memory_usage_megabytes"} <= system, \
        sorted(metrics)
