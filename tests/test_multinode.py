"""Multi-node: a 2-node local Ray cluster (separate raylets on loopback) trains with one worker on each node,
logs to an MLflow server over HTTP and writes checkpoints to shared storage."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_two_node_cluster_trains_on_both_nodes(digits_shards, mlflow_server, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.run([sys.executable, str(HERE / "multinode_driver.py"), str(digits_shards), str(tmp_path),
                           mlflow_server], capture_output=True, text=True, timeout=900, env=env, cwd=HERE.parent)
    # Ray's progress bars may share the line: take what follows the marker
    summary_line = [ln[ln.index("MULTINODE ") + len("MULTINODE "):] for ln in proc.stdout.splitlines()
                    if "MULTINODE " in ln]
    assert proc.returncode == 0 and summary_line, (proc.stdout[-3000:], proc.stderr[-3000:])
    summary = json.loads(summary_line[-1])
    assert len(summary["nodes"]) == 2
    assert summary["worker_nodes"] == summary["nodes"], summary  # one training worker on each node
    client = MlflowClient(mlflow_server)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.placement_strategy"] == "STRICT_SPREAD"
    assert [m.step for m in sorted(client.get_metric_history(summary["run_id"], "loss"), key=lambda m: m.step)] == [5, 10]
    ckpt = Path(summary["checkpoint"])
    assert ckpt.is_relative_to(Path(summary["storage"])) and (ckpt / "flowrail.json").is_file()
    assert len(list(ckpt.rglob("*optim_states.pt"))) == 2  # both nodes' ZeRO shards landed in shared storage
