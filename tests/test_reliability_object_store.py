"""Chaos row "object store unavailable for 10 s": a default 2-worker ``flowrail train`` whose checkpoints go to S3
(``train.storage_path=s3://...``, moto's server) loses the store for 10 s in the middle of a checkpoint upload.

moto keeps its data in memory, so the server is not restarted: the run reaches it through a loopback proxy
(tests/tcp_proxy.py) that drops the connection carrying the first upload of the step-10 checkpoint and refuses every
connection for 10 s. What must hold: the failed upload fails that worker group (it is not a user error), Ray Train
restarts the group from the last checkpoint the store holds (step 5; ``train.max_failures`` default 3), the run ends
FINISHED in the same MLflow run with every loss logged once per step, and its final checkpoint (step 20) is in S3,
registered by Ray Train, and is the one the driver downloads."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_train_overrides
from s3_server import make_bucket
from tcp_proxy import CuttableProxy

REPO = Path(__file__).resolve().parents[1]
OUTAGE_S = 10.0


def _objects(url: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys if k.endswith(".json")}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_object_store_down_10s_during_a_checkpoint_upload(s3_server, digits_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.train.checkpoint import read_meta

    storage = f"{make_bucket('chaos')}/ray"
    proxy = CuttableProxy(int(s3_server.rsplit(":", 1)[1]))
    # the first request into the second checkpoint directory (step 10; checkpoints at 5, 10, 15, 20)
    proxy.cut_on(rb"(?:PUT|POST) /\S*?/(checkpoint_[\w.-]+)/", OUTAGE_S, occurrence=2)
    overrides = tiny_train_overrides(digits_shards, tmp_path, run_name="s3chaos", **{
        "train.num_workers": 2, "train.steps": 20, "train.log_every": 5, "train.checkpoint_every": 5,
        "train.storage_path": storage, "samples.per_class": 1})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "FLOWRAIL_VERBOSE")}
    env.update(PYTHONPATH=str(REPO), AWS_ENDPOINT_URL=proxy.endpoint, MLFLOW_S3_ENDPOINT_URL=proxy.endpoint)
    try:
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", "train", *overrides], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=1200)
    finally:
        proxy.close()
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert proxy.cut_request is not None and len(proxy.cuts) == 1, "the outage never hit a checkpoint upload"

    # one MLflow run, FINISHED. The outage broke the step-10 checkpoint (the worker's upload, or Ray Train's record
    # of it: then flowrail fits again), so training went on from the last checkpoint the store's record names: step 5,
    # or step 0 when the outage also swallowed the record of step 5 (Ray Train registers checkpoints asynchronously)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("flowrail").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info for r in runs]
    run_id = runs[0].info.run_id
    resumed = [int(m.value) for m in client.get_metric_history(run_id, "resumed_from_step")]
    losses = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert set(resumed) <= {5} and sorted(set(losses)) == [5, 10, 15, 20], (resumed, losses)
    assert losses.count(10) == 2 and losses.count(5) == (1 if resumed else 2), losses  # step 10 was trained again

    # the final checkpoint is in the bucket, is the one Ray Train's record names, and is what the driver downloaded
    stored = _objects(f"{storage}/s3chaos")
    steps = {json.loads(body)["step"]: key for key, body in stored.items() if key.endswith("/flowrail.json")}
    assert max(steps) == 20, sorted(stored)
    snapshot = next(body for key, body in stored.items() if key.endswith("checkpoint_manager_snapshot.json"))
    assert steps[20].rsplit("/", 2)[-2] in snapshot.decode()
    local = Path(re.search(r"checkpoint (\S+)$", proc.stdout, re.M).group(1))
    assert read_meta(local)["step"] == 20 and runs[0].data.tags["flowrail.checkpoint"] == str(local)

def _refused_upload_error() -> OSError:
    """The error pyarrow's S3 filesystem (what Ray Train writes checkpoints and its record with) raises when
    nothing answers at the endpoint."""
    import pyarrow.fs as pafs

    from conftest import _free_port

    store = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{_free_port()}", scheme="http", access_key="k",
                              secret_key="s", region="us-east-1",
                              retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    try:
        with store.open_output_stream("bucket/ray/run/checkpoint_manager_snapshot.json") as out:
            out.write(b"{}")
    except OSError as exc:
        return exc
    raise AssertionError("an upload to a closed port succeeded")


def test_storage_outage_is_retried_from_the_last_checkpoint_and_nothing_else_is():
    from ray.train import ControllerError

    from pipeline.errors import CheckpointError
    from pipeline.train.storage_outage import fit_through_outages, storage_outage

    refused = _refused_upload_error()
    wrapped = ControllerError(refused)  # what Ray Train raises when its controller cannot write the record
    assert "NETWORK_CONNECTION" in storage_outage(wrapped)
    full = CheckpointError("could not store the checkpoint of step 30 in s3://b/ray/r: no space left on device")
    full.__cause__ = refused
    assert storage_outage(full) is None and storage_outage(ValueError("curlCode is a word")) is None

    waits: list[float] = []
    calls = iter([wrapped, wrapped, "done"])

    def fit():
        outcome = next(calls)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    assert fit_through_outages(fit, "s3://b/ray", retries=3, sleep=waits.append) == "done" and waits == [5.0, 10.0]
    calls = iter([wrapped, wrapped, "done"])
    with pytest.raises(ControllerError):  # out of retries
        fit_through_outages(fit, "s3://b/ray", retries=1, sleep=waits.append)
    calls = iter([wrapped, "done"])
    with pytest.raises(ControllerError):  # a local directory is no object store: not retried
        fit_through_outages(fit, "/tmp/ray", retries=3, sleep=waits.append)
    calls = iter([full, "done"])
    with pytest.raises(CheckpointError):  # a user error is raised at once
        fit_through_outages(fit, "s3://b/ray", retries=3, sleep=waits.append)
    assert waits == [5.0, 10.0, 5.0]
