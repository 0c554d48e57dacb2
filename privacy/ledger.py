"""The release ledger: one record per release of sensitive images, kept inside its own fence; it fails closed.

The ledger lives in ``$FLOWRAIL_PRIVACY_LEDGER`` (default ``~/.flowrail/privacy-ledger``), a 0700 directory that is
itself a fence (its ``manifest.json`` says ``"sensitive": true``), so no flowrail job outside the privacy stage reads
it. Records are keyed by *content*: each holds the sha256 of every image of the released set (:func:`image_hash`),
so a copied or re-sharded set is recognised as the same images wherever it lies.

A release is **reserved** (under an exclusive file lock, after every check) before any output is written and
**committed** after all of it is written. A reservation without a commit (a killed process, a full disk, a
read-only volume) blocks every further release of any set until a person resolves it with
``flowrail privacy resolve RELEASE_ID``, which counts it as released at its level (never derivable). Two
concurrent releases serialise on the lock; the second sees the first's reservation and is refused.

The ledger also holds the audit's Ed25519 signing key (:mod:`privacy.gate`) and every audit verdict per checkpoint
weight hash (``audits/<sha>.jsonl``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from privacy.secret import FENCE_DIR  # noqa: F401  (the per-set fence folder: secret)

LEDGER_ENV = "FLOWRAIL_PRIVACY_LEDGER"
RESERVED, COMMITTED, RESOLVED = "reserved", "committed", "resolved_by_hand"


class PendingReservation(ValueError):
    """A release was reserved and never committed: releases stay blocked until a person resolves it."""


def home() -> Path:
    return Path(os.environ.get(LEDGER_ENV) or Path.home() / ".flowrail" / "privacy-ledger")


def ensure_home() -> Path:
    """The ledger directory, made a fence (0700, sensitive manifest) on first use."""
    h = home()
    (h / "releases").mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(h, 0o700)
    manifest = h / "manifest.json"
    if not manifest.is_file():
        _write_json(manifest, {"sensitive": True, "kind": "privacy-ledger", "num_samples": 0, "shards": []})
    return h


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked() -> Iterator[Path]:
    """An exclusive lock on the ledger (``flock``) for one check-and-reserve or commit."""
    h = ensure_home()
    fd = os.open(h / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield h
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def image_hash(image: np.ndarray) -> str:
    """sha256 of one image's dtype, shape and bytes: the same pixels give the same hash in any shard set."""
    a = np.ascontiguousarray(image)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def records() -> list[dict[str, Any]]:
    """Every record, oldest first."""
    d = home() / "releases"
    if not d.is_dir():
        return []
    return sorted((json.loads(p.read_text()) for p in d.glob("*.json")), key=lambda r: r["created"])


def _path(release_id: str) -> Path:
    if not release_id or not all(c in "0123456789abcdef" for c in release_id):
        raise ValueError(f"'{release_id}' is not a release id")
    return home() / "releases" / f"{release_id}.json"


def check_no_pending() -> None:
    """Refuse (one line) while any reservation is uncommitted."""
    for r in records():
        if r["state"] == RESERVED:
            raise PendingReservation(
                f"release {r['release_id']} (s={r['noise_std']:g}, into {r['out']}, reserved {r['created']}) was never "
                f"committed; if no release is running, run `flowrail privacy resolve {r['release_id']}` (it counts "
                f"as released at s={r['noise_std']:g}) before releasing again")


def overlapping(hashes: set[str]) -> list[dict[str, Any]]:
    """Committed or resolved records that share at least one image with ``hashes``."""
    return [r for r in records() if r["state"] != RESERVED and hashes & set(r["image_hashes"])]


def reserve(record: dict[str, Any], check: Callable[[], None]) -> Path:
    """Under the lock: refuse a pending reservation, run ``check`` (the level / overlap rules against the records
    as they are now), then write ``record`` as reserved. Nothing is written when a check fails."""
    with locked():
        check_no_pending()
        check()
        path = _path(record["release_id"])
        _write_json(path, {**record, "state": RESERVED})
        return path


def commit(release_id: str, updates: dict[str, Any]) -> None:
    """Mark a reserved release committed, with what only the finished release knows (key maps, file hashes)."""
    with locked():
        record = json.loads(_path(release_id).read_text())
        _write_json(_path(release_id), {**record, **updates, "state": COMMITTED,
                                        "committed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def resolve(release_id: str) -> dict[str, Any]:
    """A person's resolution of a pending reservation: it counts as released at its level, and is not derivable."""
    with locked():
        path = _path(release_id)
        if not path.is_file():
            raise FileNotFoundError(f"release {release_id} is not in the ledger {home()}")
        record = json.loads(path.read_text())
        if record["state"] != RESERVED:
            raise ValueError(f"release {release_id} is {record['state']}, not a pending reservation")
        record = {**record, "state": RESOLVED, "resolved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_json(path, record)
        return record


def read_record(sensitive_dir: str | os.PathLike | None, release_id: str) -> dict[str, Any]:
    """The committed record of ``release_id`` (one line when the ledger does not know it)."""
    try:
        path = _path(str(release_id))
    except ValueError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"release {release_id} is not a release the ledger knows ({home()})"
                                + (f" for {sensitive_dir}" if sensitive_dir else ""))
    record = json.loads(path.read_text())
    if record["state"] != COMMITTED:
        raise ValueError(f"release {release_id} is {record['state']} in the ledger, not committed")
    return record


def legacy_records(sensitive_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Releases recorded by an older flowrail in the set's own fence (``.flowrail-privacy/releases``): they count
    as releases of every image of the set (fail closed), and cannot be derived from."""
    d = Path(sensitive_dir) / FENCE_DIR / "releases"
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []


def earlier_releases(sensitive_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every committed or resolved record, oldest first (kept for callers of the per-set ledger)."""
    return [r for r in records() if r["state"] != RESERVED]


# ---- the audit's signing key and verdict history (privacy.gate) ----

def signing_key() -> Any:
    """The ledger's Ed25519 private key (made on first use, 0600, never leaves the fence)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = ensure_home() / "audit_ed25519.key"
    if not path.is_file():
        with locked():
            if not path.is_file():
                key = Ed25519PrivateKey.generate()
                from cryptography.hazmat.primitives import serialization

                raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                        serialization.NoEncryption())
                _write_json(path, {"ed25519_private": raw.hex()})
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(json.loads(path.read_text())["ed25519_private"]))


def public_key_hex() -> str:
    from cryptography.hazmat.primitives import serialization

    return signing_key().public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw).hex()


def add_audit(weights_sha: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Append one audit verdict for the weights ``weights_sha``; returns every verdict for them."""
    with locked() as h:
        d = h / "audits"
        d.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(d / f"{weights_sha}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
    return audits(weights_sha)


def audits(weights_sha: str) -> list[dict[str, Any]]:
    """Every audit verdict recorded for the weights ``weights_sha``, oldest first."""
    path = home() / "audits" / f"{weights_sha}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
