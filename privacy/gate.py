"""The audit gate: nothing of a privacy-stage model leaves the stage before its audit passed, and nobody outside
the fence can forge or shop for that pass.

A privacy-stage checkpoint (its ``flowrail.json`` carries a ``privacy`` section) may have a sample grid logged to
MLflow, or be registered by ``flowrail register``, only when ``flowrail privacy audit`` wrote a passing record
(``privacy_audit.json``) into that very checkpoint:

- the record is signed (Ed25519) with the ledger's private key, which never leaves the fence
  (:mod:`privacy.ledger`); it is verified with the public key the ledger recorded for the release the checkpoint
  was trained on (the key is also bound into that release's ``release.json``, which must name the same release);
- it holds the sha256 of the checkpoint's EMA weights: a record copied to, or left in, a checkpoint whose weights
  changed reads as ``stale``;
- every audit of those weights is kept in the ledger; one failure fails the gate (re-running with new seeds until
  one passes does not work);
- thresholds looser than the defaults make the verdict "passed with loosened thresholds", which ``register``
  refuses without ``--accept-loosened-audit`` (recorded on the version).

``override`` lets a person take responsibility instead; it is recorded as a tag on the training run and on the
model version.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.errors import FlowrailError

AUDIT_FILE = "privacy_audit.json"
OVERRIDE_FLAG = "--override-privacy-audit"
LOOSENED_FLAG = "--accept-loosened-audit"
MAX_EXTRACTION_RATE = 0.01  # the defaults: a larger rate or a smaller factor is a loosened audit
NN_FLOOR_FACTOR = 0.5
PASSED, LOOSENED = "passed", "passed with loosened thresholds"


class AuditGateError(FlowrailError):
    """A privacy-stage checkpoint was about to leave the stage without a passing audit."""


def _weights_sha(ckpt: Path) -> str:
    from pipeline.data.shards import sha256_file
    from pipeline.train.checkpoint import EMA_FILE

    return sha256_file(ckpt / EMA_FILE)


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def is_privacy_checkpoint(ckpt: str | Path) -> bool:
    from pipeline.train.checkpoint import read_meta

    return "privacy" in read_meta(Path(ckpt))


def is_loosened(criterion: dict[str, Any]) -> bool:
    """Thresholds looser than the defaults: a larger allowed extraction rate or a smaller NN floor factor."""
    return (float(criterion.get("max_extraction_rate", MAX_EXTRACTION_RATE)) > MAX_EXTRACTION_RATE
            or float(criterion.get("nn_floor_factor", NN_FLOOR_FACTOR)) < NN_FLOOR_FACTOR)


def write_audit_record(ckpt: str | Path, report: dict[str, Any], release_id: str) -> Path:
    """Sign the audit's verdict (aggregates only) with the ledger's key, bound to the checkpoint's EMA weights and
    to the release ``release_id``; add it to the ledger's history of these weights; store it in the checkpoint."""
    from privacy import ledger

    ckpt = Path(ckpt)
    summary = {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool, list, dict))}
    criterion = dict(report.get("criterion") or {})
    passed, loosened = bool(report["passed"]), is_loosened(criterion)
    body = {"passed": passed, "loosened": loosened, "verdict": (LOOSENED if loosened else PASSED) if passed else
            "failed", "weights_sha256": _weights_sha(ckpt), "release_id": release_id, "criterion": criterion,
            "audited": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "report": summary}
    signature = ledger.signing_key().sign(_canonical(body)).hex()
    ledger.add_audit(body["weights_sha256"], {"passed": passed, "loosened": loosened, "audited": body["audited"],
                                              "release_id": release_id, "signature": signature})
    record = {"body": body, "signature": signature, "public_key": ledger.public_key_hex()}
    path = ckpt / AUDIT_FILE
    tmp = ckpt / f".{AUDIT_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def _trusted_key(ckpt: Path, body: dict[str, Any]) -> str | None:
    """The public key the ledger recorded for the release the record names, when the checkpoint was trained on
    that release (its ``privacy.release``, when recorded, must be a release.json naming the same id)."""
    from privacy import ledger
    from privacy.release import read_release
    from pipeline.train.checkpoint import read_meta

    rid = body.get("release_id")
    trained_on = read_meta(ckpt).get("privacy", {}).get("release")
    try:
        if trained_on:
            rel = read_release(trained_on)
            if rel.get("release_id") != rid:
                return None
        return ledger.read_record(None, str(rid)).get("audit_public_key")
    except (OSError, ValueError, KeyError):
        return None


def audit_status(ckpt: str | Path) -> str:
    """``"passed"``, ``"passed with loosened thresholds"``, ``"failed"`` (this or any earlier audit of these
    weights), ``"stale"`` (weights changed since), ``"forged"`` (no valid signature by the ledger's key for the
    checkpoint's release) or ``"missing"``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from privacy import ledger

    ckpt = Path(ckpt)
    path = ckpt / AUDIT_FILE
    if not path.is_file():
        return "missing"
    try:
        record = json.loads(path.read_text())
        body, signature = record["body"], bytes.fromhex(record["signature"])
        key = _trusted_key(ckpt, body)
        if key is None:
            return "forged"
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key)).verify(signature, _canonical(body))
    except (OSError, ValueError, KeyError, TypeError, InvalidSignature):
        return "forged"
    if body.get("weights_sha256") != _weights_sha(ckpt):
        return "stale"
    history = ledger.audits(body["weights_sha256"])
    if record["signature"] not in {h.get("signature") for h in history}:
        return "forged"
    if not all(h.get("passed") for h in history):
        return "failed"
    return LOOSENED if any(h.get("loosened") for h in history) else PASSED


def require_audit_passed(checkpoint: str | Path, *, override: bool = False, tracking_uri: str | None = None,
                         accept_loosened: bool = False) -> dict[str, str]:
    """Raise :class:`AuditGateError` (one line) unless ``checkpoint`` is not a privacy-stage checkpoint or passed
    every audit of its weights (a pass with loosened thresholds needs ``accept_loosened``); with ``override``,
    record the override on the training run and return the tags for the model version. Returns the model-version
    tags either way."""
    from pipeline.train.checkpoint import find_latest, read_meta

    ckpt = find_latest(checkpoint)
    meta = read_meta(ckpt)
    if "privacy" not in meta:
        return {}
    status = audit_status(ckpt)
    if status == PASSED:
        return {"privacy.audit": PASSED}
    if status == LOOSENED and accept_loosened:
        return {"privacy.audit": LOOSENED, "privacy.audit_loosened_accepted": "true"}
    if not override:
        if status == LOOSENED:
            raise AuditGateError(f"{ckpt} is a privacy-stage checkpoint whose audit {status}; pass {LOOSENED_FLAG} "
                                 f"to accept it (recorded on the version), or audit it with the default thresholds")
        raise AuditGateError(f"{ckpt} is a privacy-stage checkpoint whose audit is {status}; run `flowrail privacy "
                             f"audit {ckpt} --sensitive DIR` first (or pass {OVERRIDE_FLAG}, recorded)")
    run_id = meta.get("mlflow_run_id")
    if run_id and tracking_uri:
        from pipeline.tracking import client

        c = client(tracking_uri)
        c.set_tag(run_id, "privacy.audit", status)
        c.set_tag(run_id, "privacy.audit_override", "true")
    return {"privacy.audit": status, "privacy.audit_override": "true"}


def log_sample_grid(checkpoint: str | Path, *, per_class: int | None = None, seed: int | None = None,
                    accept_loosened: bool = False) -> Path:
    """The privacy stage's only way to log sample images: after the gate, a class grid into the checkpoint's run."""
    from pipeline.config import tracking_uri
    from pipeline.sampling import class_grid
    from pipeline.tracking import client
    from pipeline.train.checkpoint import find_latest, load_trained

    ckpt = find_latest(checkpoint)
    require_audit_passed(ckpt, accept_loosened=accept_loosened)
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
