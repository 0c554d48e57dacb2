"""pytest plugin: a real S3-compatible server (moto's standalone server) on 127.0.0.1 for the object-store tests.

Credentials and the endpoint reach flowrail the way they do on a cluster: through the standard environment only.
When pytest starts (before any Ray starts, so every Ray worker inherits them) this plugin sets
``AWS_ENDPOINT_URL=http://127.0.0.1:<port>``, test keys, ``AWS_REGION`` and ``AWS_EC2_METADATA_DISABLED`` (no
instance-metadata lookups); the server itself starts on first use of the ``s3_server`` fixture, on that port.
Nothing leaves the loopback interface.
"""
from __future__ import annotations

import os
import socket
import sys
import uuid

import pytest

_PORT: int | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config) -> None:
    global _PORT
    _PORT = _free_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{_PORT}", AWS_ACCESS_KEY_ID="flowrail-test",
                      AWS_SECRET_ACCESS_KEY="flowrail-test-secret", AWS_REGION="us-east-1",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                      MLFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{_PORT}")


def run_moto(port: int, log_path, env: dict[str, str] | None = None):
    """Start moto's S3 server on 127.0.0.1:``port``, yield its endpoint once it answers, stop it afterwards.
    ``env``: extra server environment (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT`` to make it check credentials)."""
    from server_process import serve

    endpoint = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with serve(command, f"{endpoint}/moto-api/", log_path, "moto server", env={**os.environ, **(env or {})}):
        yield endpoint


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on the port in ``AWS_ENDPOINT_URL``; yields the endpoint URL."""
    pytest.importorskip("moto.server", reason="the object-store tests need `pip install 'moto[server]'`")
    yield from run_moto(_PORT, tmp_path_factory.mktemp("s3-server") / "moto.log")


def make_bucket(prefix: str = "flowrail") -> str:
    """A new, empty bucket on the test server; returns ``s3://<name>``."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket for one test: ``s3://flowrail-<random>``."""
    return make_bucket()


@pytest.fixture(scope="session")
def s3_digits(s3_server) -> str:
    """The digits train/val shard sets written by ``flowrail shards digits --out s3://<bucket>/data/digits``."""
    from jobs.cli import main

    root = f"{make_bucket()}/data/digits"
    assert main(["shards", "digits", "--out", root, "--samples-per-shard", "256"]) == 0
    return root
