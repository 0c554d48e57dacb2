"""The privacy boundary: marking shard sets sensitive. The check itself lives below every reader, in
:mod:`pipeline.data.fence` (re-exported here: ``check_readable``, ``fence_of``, ``inside``).

A shard set is a directory of WebDataset tars with a ``manifest.json`` (written by ``pipeline.data.shards``).
A sensitive set carries ``"sensitive": true`` in that manifest. Only ``flowrail privacy release`` reads a sensitive
set (``allow_sensitive=True``); every other reader calls :func:`check_readable` first and gets a one-line
``PermissionError``.

The fence is a directory tree, not one folder: a source is refused when the directory it names, *any* directory
above it (walking up to the filesystem root) or one of its immediate sub-directories holds a sensitive manifest.
A manifest may list only shards inside its own directory (no ``..``, no absolute names, no symlink leading out), so a
public-looking manifest cannot name a fenced shard. Remote sources are refused when they start with a prefix in the
fence registry (one URL prefix per line in ``$FLOWRAIL_FENCE_REGISTRY``, default ``~/.flowrail/fenced_prefixes``;
``flowrail privacy mark URL`` adds one).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from pipeline.data.fence import (MANIFEST, REGISTRY_ENV, SENSITIVE_KEY, check_path, check_readable,  # noqa: F401
                                 fence_of, fence_registry, fenced_prefixes, inside, is_sensitive)


def manifest_path(shard_dir: str | os.PathLike) -> Path:
    """``<shard_dir>/manifest.json`` (or the path itself when it already names a ``.json`` file)."""
    p = Path(shard_dir)
    return p if p.suffix == ".json" else p / MANIFEST


def read_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Load a shard set's manifest; a missing or unreadable one is a one-line error naming the file."""
    path = manifest_path(shard_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"shard manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"shard manifest {path} must hold a JSON object")
    return data


def write_manifest(shard_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write a manifest atomically (temp file + rename), so a reader never sees half a file."""
    path = manifest_path(shard_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(dict(manifest), fh, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def fence_url(prefix: str) -> Path:
    """Add a URL prefix (``s3://bucket/faces/``) to the fence registry (idempotent)."""
    if "://" not in prefix:
        raise ValueError(f"{prefix} is not a URL (local shard sets are fenced with `flowrail privacy mark DIR`)")
    path = fence_registry()
    if prefix not in fenced_prefixes():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(prefix + "\n")
    return path


def mark_sensitive(shard_dir: str | os.PathLike) -> Path:
    """Declare a shard set sensitive (idempotent). The set must exist and hold a manifest; a URL goes into the
    fence registry instead."""
    if "://" in str(shard_dir) and not str(shard_dir).startswith("file://"):
        return fence_url(str(shard_dir))
    d = Path(str(shard_dir).removeprefix("file://"))
    if not d.is_dir():
        raise FileNotFoundError(f"shard directory not found: {d}")
    manifest = read_manifest(d)
    manifest[SENSITIVE_KEY] = True
    return write_manifest(d, manifest)


