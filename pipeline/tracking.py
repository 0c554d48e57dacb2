"""MLflow tracking: one run per training run (created by the driver, written to by rank 0).

The run id is kept beside the Ray run so that re-running the same ``run_name`` resumes the same MLflow run.
Metrics go through :class:`MetricLogger`, which either fails when the server stays unreachable or buffers the
metrics (default) and flushes them when it returns (``tracking.on_unreachable``). MLflow's own HTTP retries (7, with
exponential backoff) stay on for the driver's calls and for ``fail``; a buffering logger retries by itself, so each of
its sends is one request of at most ``tracking.buffer_grace_s`` (the run's last send: what is left of it), and an
unresponsive server cannot hold a finished run's GPUs for MLflow's ~20 minutes (120 s timeout x 8 attempts). The
reachability probe before a run starts is quick, so an unreachable server fails a run at once.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import TrainJobConfig, flatten, tracking_uri
from pipeline.errors import FlowrailError

SECRET_MARKERS = ("password", "token", "secret", "credential", "api_key", "access_key", "private_key")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact(value: str) -> str:
    """``scheme://user:pass@host/...`` → ``scheme://***@host/...``: credentials never reach logs or params."""
    return _USERINFO.sub(r"\g<scheme>***@", value)


def _salted(uri: str) -> str:
    """A salted fingerprint of the URI (:mod:`pipeline.fingerprint`) for files that must recognise the store."""
    from pipeline.fingerprint import salted_fingerprint

    return salted_fingerprint(uri)


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


def _unreachable(uri: str, exc: BaseException | str) -> TrackingError:
    why = exc if isinstance(exc, str) else type(exc).__name__
    return TrackingError(f"MLflow tracking server {redact(uri)} is unreachable ({why}); "
                         f"start it or fix tracking.tracking_uri / $MLFLOW_TRACKING_URI")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """One quick ``GET /health`` of an http(s) server, without MLflow's minutes of retries; raises TrackingError.

    Other stores (sqlite, file, databricks) are not probed here."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as exc:
        raise _unreachable(uri, exc) from None


_RETRY_ENV = threading.RLock()  # MLflow reads its HTTP settings from os.environ at each request


@contextmanager
def few_retries(retries: int = 1, timeout_s: int = 10) -> Iterator[None]:
    """MLflow calls inside use at most ``retries`` HTTP retries of at most ``timeout_s`` each
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT``, read by MLflow at every request): for
    calls that must not keep a user or a finished run waiting for minutes. Process-wide while it lasts; one such
    block at a time (a lock), so two threads never undo each other's setting."""
    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    with _RETRY_ENV:
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(retries), MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_s))
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


MLFLOW_DEFAULT_TIMEOUT_S = 120  # MLflow's MLFLOW_HTTP_REQUEST_TIMEOUT default


def request_timeout(budget_s: float) -> int:
    """The timeout of one MLflow request that must end within ``budget_s``: ``clamp(ceil(budget_s), 1, 120)`` s
    (MLflow takes whole seconds)."""
    import math

    return int(min(MLFLOW_DEFAULT_TIMEOUT_S, max(1, math.ceil(budget_s))))


def mark_terminated(uri: str, run_id: str, status: str) -> bool:
    """Set a run's final status after a failure, guarded: a server that is gone too gives one printed line, never
    MLflow's traceback in place of the error that matters. True when the status was set."""
    try:
        with few_retries():
            client(uri).set_terminated(run_id, status=status)
        return True
    except Exception as exc:  # noqa: BLE001 - any MLflow/requests error: the original failure is what we report
        print(f"[flowrail] could not mark MLflow run {run_id} {status} at {redact(uri)} ({type(exc).__name__}); "
              f"a re-run of the same run_name resumes it", flush=True)
        return False


def ensure_experiment(uri: str, name: str) -> str:
    check_reachable(uri)
    c = client(uri)
    try:
        exp = c.get_experiment_by_name(name)
        return exp.experiment_id if exp else c.create_experiment(name)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for an unreachable server
        raise _unreachable(uri, exc) from None


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
    uri = tracking_uri(cfg)
    record = run_record(cfg)
    if record.is_file():
        saved = json.loads(record.read_text())
        from pipeline.fingerprint import fingerprint_matches  # salted (issue 32): no unsalted hash is written

        if fingerprint_matches(uri, saved.get("tracking_uri_fingerprint", "")) \
                or saved.get("tracking_uri_sha256") == uri_fingerprint(uri):  # (older records: read only)
            check_reachable(uri)
            try:
                c = client(uri)
                c.update_run(saved["run_id"], status="RUNNING")
                if SET_UP_TAG not in c.get_run(saved["run_id"]).data.tags:  # killed while its params were logged
                    _set_up(c, saved["run_id"], cfg)
                return saved["run_id"], True
            except Exception:  # noqa: BLE001 - the run was deleted or the store replaced: start a new one
                pass
    experiment_id = ensure_experiment(uri, cfg.tracking.experiment)
    c = client(uri)
    run = c.create_run(experiment_id, run_name=cfg.run_name, tags={"flowrail.job": "train", **(tags or {})})
    # the record first: a driver killed while the params are logged leaves a run its re-run finds, not an orphan
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": redact(uri),
                                  "tracking_uri_fingerprint": _salted(uri)}))
    _set_up(c, run.info.run_id, cfg)
    return run.info.run_id, False


SET_UP_TAG = "mlflow.note.content"  # written last when a run is set up


def _set_up(c: Any, run_id: str, cfg: TrainJobConfig) -> None:
    """The new run's params (the resolved config), then its note: the note marks a run whose set-up finished."""
    from mlflow.entities import Param, RunTag

    params = [Param(k, v) for k, v in loggable_params(cfg).items()]
    for i in range(0, len(params), 90):
        c.log_batch(run_id, params=params[i:i + 90])
    c.log_batch(run_id, tags=[RunTag(SET_UP_TAG, f"flowrail run {cfg.run_name}")])


def metric_spool(cfg: TrainJobConfig) -> Path:
    """Where rank 0 keeps metrics not yet accepted by the server: beside the run record, in the run's storage."""
    return run_record(cfg).parent / "pending_metrics.jsonl"


class MetricLogger:
    """Log metric dicts to one run; on an unreachable server either raise (``fail``) or buffer and retry (``buffer``).

    Each metric gets its step and wall-clock timestamp when it is recorded; those are what the server receives,
    however late. With a ``spool`` file the pending metrics also live on disk (one JSON line each), so a restarted
    worker group or a re-run of the run sends what a killed rank 0 had not sent yet. A metric re-sent after a crash
    between "sent" and "spool rewritten" is the same (key, step, timestamp, value): MLflow's SQL store ignores it.
    ``record`` is cheap (memory + one appended line) and safe to call from the training loop; ``flush`` does the
    network I/O, so the loop runs it on a background thread. Under ``buffer`` a send is one HTTP request (no MLflow
    retries: the pending metrics are retried by the next flush) with a timeout of ``grace_s`` (1-120 s), and the
    final flush gives each attempt only what is left of its ``grace_s``: a run's end waits for the tracking server
    at most about ``2 * grace_s`` (a send in flight, then the final flush), never MLflow's ~20 minutes.
    ``failures`` counts the sends failed since the last one that went through (0 once the server takes metrics
    again); each outage prints one line when it starts and one when it ends.
    """

    def __init__(self, uri: str, run_id: str, policy: str = "buffer", grace_s: float = 60.0,
                 spool: Path | str | None = None) -> None:
        self.uri, self.run_id, self.policy, self.grace_s = uri, run_id, policy, grace_s
        self.spool = Path(spool) if spool else None
        self.pending: list[Any] = []
        self.failures = 0
        self.recovered = 0
        self._lock = threading.Lock()
        if self.spool is not None and self.spool.is_file():
            self.pending = [_metric(json.loads(line)) for line in self.spool.read_text().splitlines() if line.strip()]
            self.recovered = len(self.pending)

    def record(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        new = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with self._lock:
            self.pending.extend(new)
            if self.spool is not None:
                self.spool.parent.mkdir(parents=True, exist_ok=True)
                with self.spool.open("a") as f:
                    f.writelines(json.dumps(_as_dict(m)) + "\n" for m in new)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.record(metrics, step)
        self.flush()

    def _send(self, budget_s: float | None = None) -> None:
        """Send the pending metrics in batches; under ``buffer`` each request bounded by ``budget_s`` (no retries)."""
        if self.policy == "buffer":
            with few_retries(retries=0, timeout_s=request_timeout(self.grace_s if budget_s is None else budget_s)):
                self._send_batches()
        else:
            self._send_batches()

    def _send_batches(self) -> None:
        c = client(self.uri)
        while True:
            with self._lock:
                batch = self.pending[:900]
            if not batch:
                return
            c.log_batch(self.run_id, metrics=batch)
            with self._lock:
                del self.pending[:len(batch)]
                self._rewrite_spool()

    def _rewrite_spool(self) -> None:
        if self.spool is None:
            return
        if not self.pending:
            self.spool.unlink(missing_ok=True)
            return
        tmp = self.spool.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(_as_dict(m)) + "\n" for m in self.pending))
        os.replace(tmp, self.spool)

    def flush(self, final: bool = False) -> bool:
        """Send what is pending; False if some is still pending (``buffer``: after ``grace_s`` when ``final``)."""
        deadline = time.monotonic() + (self.grace_s if final and self.policy == "buffer" else 0.0)
        while self.pending:
            try:
                self._send(budget_s=deadline - time.monotonic() if final else None)
                if self.failures:
                    print(f"[flowrail] tracking server {redact(self.uri)} reachable again: buffered metric values "
                          f"sent", flush=True)
                self.failures = 0
            except Exception as exc:  # noqa: BLE001
                self.failures += 1
                if self.policy == "fail":
                    raise TrackingError(f"MLflow tracking server {redact(self.uri)} is unreachable "
                                        f"({type(exc).__name__}); set tracking.on_unreachable=buffer to train on") \
                        from None
                if self.failures == 1 or final:
                    print(f"[flowrail] tracking server {redact(self.uri)} unreachable: {len(self.pending)} metric "
                          f"values buffered" + (f" in {self.spool}" if self.spool else ""), flush=True)
                if time.monotonic() >= deadline:
                    return False
                time.sleep(1.0)
        return True


def _as_dict(m: Any) -> dict[str, Any]:
    return {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}


def _metric(d: dict[str, Any]) -> Any:
    from mlflow.entities import Metric

    return Metric(d["key"], float(d["value"]), int(d["timestamp"]), int(d["step"]))


def mlflow_ui_hint(uri: str) -> str:
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {redact(uri)}"
