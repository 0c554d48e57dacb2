"""The verification record of a shard set: ``verified.json`` beside its manifest.

``{"manifest_sha256": sha256(manifest bytes), "sizes": [bytes of each shard], "verified": time}``. Written by the
shard writer (digests taken as the bytes are written) and by :func:`pipeline.data.verify.ensure_verified`; this
module knows only the record, not how a set is read, so the writer and the verifier both sit above it.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from pipeline.data import storage
from pipeline.errors import DataError

VERIFIED = "verified.json"


def manifest_digest(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()


def write_record(set_dir: str, manifest_bytes: bytes, sizes: list[int | None]) -> bool:
    """Record the set in ``set_dir`` with this manifest and these shard sizes as verified; False (and nothing
    else) if the set is read-only."""
    record = {"manifest_sha256": manifest_digest(manifest_bytes), "sizes": sizes,
              "verified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        storage.write_bytes(storage.join(set_dir, VERIFIED), json.dumps(record).encode())
    except (DataError, OSError):
        return False
    return True


def read_record(set_dir: str) -> dict[str, Any]:
    """The recorded verification of the set in ``set_dir``, or {} when there is none (or it is unreadable)."""
    path = storage.join(set_dir, VERIFIED)
    try:
        if not storage.exists(path):
            return {}
        record = json.loads(storage.read_bytes(path))
    except (DataError, OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
