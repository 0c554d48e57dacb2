"""Start a test server as a subprocess, wait until it answers, stop it afterwards: the one loop behind the MLflow
server fixture (tests/conftest.py) and moto's S3 server (tests/s3_server.py)."""
from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def serve(command: list[str], probe_url: str, log_path: Path, name: str, env: dict[str, str] | None = None,
          healthy=lambda status: True, timeout_s: float = 120.0) -> Iterator[subprocess.Popen]:
    """Context manager: run ``command`` (output to ``log_path``), give the process once ``probe_url`` answers with a status that
    ``healthy`` accepts, terminate it (then kill) afterwards. A server that exits or never answers raises with the
    end of its log."""
    log = open(log_path, "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(probe_url, timeout=2) as resp:
                    if healthy(resp.status):
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {Path(log_path).read_text()[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"{name} did not answer within {timeout_s:.0f} s")
            time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
