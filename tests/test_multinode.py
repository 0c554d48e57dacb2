"""Multi-node: a 2-node local Ray cluster (separate raylets on loopback) trains with one worker on each node,
reads its shards from and writes its checkpoints to an S3-compatible object store (no local directory shared
between the nodes), and logs to an MLflow server over HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from s3_server import make_bucket

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_two_node_cluster_trains_on_both_nodes(s3_digits, mlflow_server, tmp_path):
    import boto3

    storage = f"{make_bucket('ckpt')}/ray"
    env = {**os.environ, "RAY_ADDRESS": ""}  # the AWS_* variables of tests/s3_server.py pass through
    env.pop("RAY_ADDRESS")
    proc = subprocess.run([sys.executable, str(HERE / "multinode_driver.py"), s3_digits, storage, str(tmp_path),
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
    losses = sorted(client.get_metric_history(summary["run_id"], "loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [5, 10]
    bucket, _, prefix = storage.removeprefix("s3://").partition("/")
    keys = [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                                Prefix=prefix)
            for o in page.get("Contents", [])]
    final = Path(summary["checkpoint"]).name  # the driver's download of the last checkpoint, named as in S3
    assert any(k.endswith(f"{final}/flowrail.json") for k in keys), keys
    assert len([k for k in keys if final in k and k.endswith("optim_states.pt")]) == 2  # both nodes' ZeRO shards
    local = [p for p in tmp_path.rglob("flowrail.json") if "checkpoints" not in p.parts]
    assert not local, local  # no checkpoint storage on local disk (only the driver's download of the last one)
