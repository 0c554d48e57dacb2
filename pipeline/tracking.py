"""MLflow tracking: one run per training run (created by the driver, written to by rank 0).

The run id is kept beside the Ray run so that re-running the same ``run_name`` resumes the same MLflow run.
Metrics go through :class:`MetricLogger`, which either fails fast when the server is unreachable or buffers the
metrics and flushes them when it returns (``tracking.on_unreachable``).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from pipeline.config import TrainJobConfig, flatten, tracking_uri
from pipeline.errors import FlowrailError

SECRET_MARKERS = ("password", "token", "secret", "credential", "api_key", "access_key", "private_key")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact(value: str) -> str:
    """``scheme://user:pass@host/...`` → ``scheme://***@host/...``: credentials never reach logs or params."""
    return _USERINFO.sub(r"\g<scheme>***@", value)


def uri_fingerprint(uri: str) -> str:
    """SHA-256 of a tracking URI: lets a file recognise the same store without holding its credentials."""
    import hashlib

    return hashlib.sha256(uri.encode()).hexdigest()


def shareable_config(data: dict[str, Any]) -> dict[str, Any]:
    """A dumped config safe to write into checkpoints, artifacts and exported YAML: no tracking URI (the store comes
    from the environment where the file is used), no values under credential-like keys, URL userinfo redacted."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if any(marker in str(key).lower() for marker in SECRET_MARKERS):
            continue
        if isinstance(value, dict):
            value = shareable_config(value)
        elif isinstance(value, str):
            value = redact(value)
        out[key] = value
    if isinstance(out.get("tracking"), dict) and "tracking_uri" in out["tracking"]:
        out["tracking"]["tracking_uri"] = None
    return out


class TrackingError(FlowrailError):
    """The tracking server cannot be reached."""


def client(uri: str):  # noqa: ANN201
    from mlflow.tracking import MlflowClient

    if redact(uri) != uri:  # MLflow prints each ended run's URL, userinfo included, unless told not to
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"

    return MlflowClient(tracking_uri=uri)


def _quiet_mlflow_http() -> None:
    # fail fast on an unreachable server instead of retrying for minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def ensure_experiment(uri: str, name: str) -> str:
    _quiet_mlflow_http()
    c = client(uri)
    try:
        exp = c.get_experiment_by_name(name)
        return exp.experiment_id if exp else c.create_experiment(name)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for an unreachable server
        raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable ({type(exc).__name__}); "
                            f"start it or fix tracking.tracking_uri / $MLFLOW_TRACKING_URI") from None


def loggable_params(cfg: TrainJobConfig) -> dict[str, str]:
    """Resolved config as MLflow params; never values of keys that look like credentials, nor URL userinfo."""
    params = {}
    for key, value in flatten(cfg).items():
        if any(marker in key.lower() for marker in SECRET_MARKERS):
            continue
        params[key] = redact(str(value))[:500]
    return params


def run_record(cfg: TrainJobConfig) -> Path:
    return Path(cfg.run_dir) / "ray" / cfg.run_name / "mlflow_run.json"


def start_or_resume_run(cfg: TrainJobConfig, tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The MLflow run of this training run: resumed when the run record exists, else created with params."""
    from mlflow.entities import Param, RunTag

    uri = tracking_uri(cfg)
    record = run_record(cfg)
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("tracking_uri_sha256") == uri_fingerprint(uri) or saved.get("tracking_uri") == uri:
            try:
                client(uri).update_run(saved["run_id"], status="RUNNING")
                return saved["run_id"], True
            except Exception:  # noqa: BLE001 - the run was deleted or the store replaced: start a new one
                pass
    experiment_id = ensure_experiment(uri, cfg.tracking.experiment)
    c = client(uri)
    run = c.create_run(experiment_id, run_name=cfg.run_name, tags={"flowrail.job": "train", **(tags or {})})
    params = [Param(k, v) for k, v in loggable_params(cfg).items()]
    for i in range(0, len(params), 90):
        c.log_batch(run.info.run_id, params=params[i:i + 90])
    c.log_batch(run.info.run_id, tags=[RunTag("mlflow.note.content", f"flowrail run {cfg.run_name}")])
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": redact(uri),
                                  "tracking_uri_sha256": uri_fingerprint(uri)}))
    return run.info.run_id, False


class MetricLogger:
    """Log metric dicts to one run; on an unreachable server either raise (``fail``) or buffer and retry (``buffer``).

    Buffered metrics keep their original step and timestamp; every later ``log`` retries them, and the final
    ``flush(final=True)`` waits up to ``grace_s`` seconds for the server to return.
    """

    def __init__(self, uri: str, run_id: str, policy: str = "fail", grace_s: float = 60.0) -> None:
        _quiet_mlflow_http()
        self.uri, self.run_id, self.policy, self.grace_s = uri, run_id, policy, grace_s
        self.pending: list[Any] = []
        self.failures = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self.flush()

    def _send(self) -> None:
        c = client(self.uri)
        while self.pending:
            c.log_batch(self.run_id, metrics=self.pending[:900])
            self.pending = self.pending[900:]

    def flush(self, final: bool = False) -> bool:
        deadline = time.monotonic() + (self.grace_s if final and self.policy == "buffer" else 0.0)
        while self.pending:
            try:
                self._send()
            except Exception as exc:  # noqa: BLE001
                self.failures += 1
                if self.policy == "fail":
                    raise TrackingError(f"MLflow tracking server {redact(self.uri)} is unreachable "
                                        f"({type(exc).__name__}); set tracking.on_unreachable=buffer to train on") \
                        from None
                if self.failures == 1 or final:
                    print(f"[flowrail] tracking server {redact(self.uri)} unreachable: {len(self.pending)} metric "
                          f"values buffered", flush=True)
                if time.monotonic() >= deadline:
                    return False
                time.sleep(1.0)
        return True


def mlflow_ui_hint(uri: str) -> str:
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {redact(uri)}"
