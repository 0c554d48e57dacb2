"""What the privacy stage keeps inside the fence: one record per release of a sensitive set.

``<sensitive>/.flowrail-privacy/releases/<release_id>.json`` holds the release's level, what it was derived from,
and the map from each public (random) sample key to the sensitive set's own key — for the noisy copies and for the
consented clean samples. Being under the sensitive directory, these files are inside its fence: every reader other
than the privacy stage is refused them (:func:`privacy.boundary.check_readable`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from privacy.secret import FENCE_DIR


def ledger_dir(sensitive_dir: str | os.PathLike) -> Path:
    return Path(sensitive_dir) / FENCE_DIR / "releases"


def earlier_releases(sensitive_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every recorded release of this sensitive set, oldest first."""
    d = ledger_dir(sensitive_dir)
    if not d.is_dir():
        return []
    records = [json.loads(p.read_text()) for p in d.glob("*.json")]
    return sorted(records, key=lambda r: r["created"])


def read_record(sensitive_dir: str | os.PathLike, release_id: str) -> dict[str, Any]:
    path = ledger_dir(sensitive_dir) / f"{release_id}.json"
    if not path.is_file():
        raise FileNotFoundError(f"release {release_id} is not a release of {sensitive_dir} (no record in its fence)")
    return json.loads(path.read_text())


def write_record(sensitive_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    d = ledger_dir(sensitive_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = d / f"{record['release_id']}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    return path
