"""The audit gate: nothing of a privacy-stage model leaves the stage before its audit passed.

A privacy-stage checkpoint (its ``flowrail.json`` carries a ``privacy`` section) may have a sample grid logged to
MLflow, or be registered by ``flowrail register``, only when ``flowrail privacy audit`` wrote a passing record
(``privacy_audit.json``) into that very checkpoint: the record holds the sha256 of the checkpoint's EMA weights, so
a record copied to, or left in, a checkpoint whose weights changed does not count. ``override`` lets a person take
responsibility instead; it is recorded as a tag on the training run and on the model version.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.errors import FlowrailError

AUDIT_FILE = "privacy_audit.json"
OVERRIDE_FLAG = "--override-privacy-audit"


class AuditGateError(FlowrailError):
    """A privacy-stage checkpoint was about to leave the stage without a passing audit."""


def _weights_sha(ckpt: Path) -> str:
    from pipeline.data.shards import sha256_file
    from pipeline.train.checkpoint import EMA_FILE

    return sha256_file(ckpt / EMA_FILE)


def is_privacy_checkpoint(ckpt: str | Path) -> bool:
    from pipeline.train.checkpoint import read_meta

    return "privacy" in read_meta(Path(ckpt))


def write_audit_record(ckpt: str | Path, report: dict[str, Any]) -> Path:
    """Store the audit's verdict (statistics only) in the checkpoint, bound to its EMA weights."""
    ckpt = Path(ckpt)
    summary = {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool, list, dict))}
    record = {"passed": bool(report["passed"]), "weights_sha256": _weights_sha(ckpt),
              "audited": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "report": summary}
    path = ckpt / AUDIT_FILE
    tmp = ckpt / f".{AUDIT_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def audit_status(ckpt: str | Path) -> str:
    """``"passed"``, ``"failed"``, ``"stale"`` (weights changed since) or ``"missing"``."""
    path = Path(ckpt) / AUDIT_FILE
    if not path.is_file():
        return "missing"
    record = json.loads(path.read_text())
    if record.get("weights_sha256") != _weights_sha(Path(ckpt)):
        return "stale"
    return "passed" if record.get("passed") else "failed"


def require_audit_passed(checkpoint: str | Path, *, override: bool = False,
                         tracking_uri: str | None = None) -> dict[str, str]:
    """Raise :class:`AuditGateError` (one line) unless ``checkpoint`` is not a privacy-stage checkpoint or passed
    its audit; with ``override``, record the override on the training run and return the tags for the model
    version. Returns the model-version tags either way."""
    from pipeline.train.checkpoint import find_latest, read_meta

    ckpt = find_latest(checkpoint)
    meta = read_meta(ckpt)
    if "privacy" not in meta:
        return {}
    status = audit_status(ckpt)
    if status == "passed":
        return {"privacy.audit": "passed"}
    if not override:
        raise AuditGateError(f"{ckpt} is a privacy-stage checkpoint whose audit is {status}; run `flowrail privacy "
                             f"audit {ckpt} --sensitive DIR` first (or pass {OVERRIDE_FLAG}, recorded)")
    run_id = meta.get("mlflow_run_id")
    if run_id and tracking_uri:
        from pipeline.tracking import client

        c = client(tracking_uri)
        c.set_tag(run_id, "privacy.audit", status)
        c.set_tag(run_id, "privacy.audit_override", "true")
    return {"privacy.audit": status, "privacy.audit_override": "true"}


def log_sample_grid(checkpoint: str | Path, *, per_class: int | None = None, seed: int | None = None) -> Path:
    """The privacy stage's only way to log sample images: after the gate, a class grid into the checkpoint's run."""
    from pipeline.config import tracking_uri
    from pipeline.sampling import class_grid
    from pipeline.tracking import client
    from pipeline.train.checkpoint import find_latest, load_trained

    ckpt = find_latest(checkpoint)
    require_audit_passed(ckpt)
    trained = load_trained(ckpt)
    cfg = trained.config
    out_dir = Path(cfg.run_dir) / "samples" / cfg.run_name
    grid, nfe = class_grid(trained, out_dir / f"samples_step{trained.step:07d}.png",
                           per_class or cfg.samples.per_class, cfg.samples.seed if seed is None else seed)
    if trained.run_id:
        c = client(tracking_uri(cfg))
        c.log_artifact(trained.run_id, str(grid), artifact_path="samples")
        c.log_metric(trained.run_id, "sample_nfe", nfe, step=trained.step)
    return grid
