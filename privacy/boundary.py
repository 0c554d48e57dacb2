"""The privacy boundary: which shard sets are sensitive, and who may read them.

A shard set is a directory of WebDataset tars with a ``manifest.json`` (written by ``pipeline.data.shards``).
A sensitive set carries ``"sensitive": true`` in that manifest. Only ``flowrail privacy release`` reads a sensitive
set (``allow_sensitive=True``); every other reader calls :func:`check_readable` first and gets a one-line
``PermissionError``. A directory whose parent or immediate children hold a sensitive manifest is refused too, so
pointing a job one level up or down from a sensitive set does not slip past the check.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

MANIFEST = "manifest.json"
SENSITIVE_KEY = "sensitive"


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


def is_sensitive(manifest: Mapping[str, Any]) -> bool:
    """True when the manifest declares its shard set sensitive."""
    return bool(manifest.get(SENSITIVE_KEY, False))


def mark_sensitive(shard_dir: str | os.PathLike) -> Path:
    """Declare a shard set sensitive (idempotent). The set must exist and hold a manifest."""
    d = Path(shard_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"shard directory not found: {d}")
    manifest = read_manifest(d)
    manifest[SENSITIVE_KEY] = True
    return write_manifest(d, manifest)


def _local_dir(source: str | os.PathLike) -> Path | None:
    """The local directory a shard source refers to: a dir, a manifest file, or a tar / brace pattern in a dir."""
    text = str(source)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        return None
    p = Path(text)
    if p.is_dir():
        return p
    if p.suffix in (".json", ".tar") or "{" in p.name or "*" in p.name:
        return p.parent
    return p if p.exists() else None


def _sensitive_manifests(d: Path) -> list[Path]:
    """Sensitive manifests in ``d``, its parent, or its immediate sub-directories."""
    candidates = [d / MANIFEST, d.parent / MANIFEST]
    try:
        candidates += [c / MANIFEST for c in d.iterdir() if c.is_dir()]
    except OSError:
        pass
    found = []
    for m in candidates:
        if m.is_file():
            try:
                data = json.loads(m.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict) and is_sensitive(data):
                found.append(m)
    return found


def check_readable(source: str | os.PathLike | Mapping[str, Any], job: str, allow_sensitive: bool = False) -> None:
    """Refuse to let ``job`` read a sensitive shard set.

    ``source`` is a shard directory, a manifest path, a tar / brace pattern inside a shard directory, or an already
    loaded manifest dict. Raises ``PermissionError`` (one line) unless ``allow_sensitive`` — which only
    ``flowrail privacy release`` passes. Remote URLs carry no local manifest and are not checked here.
    """
    if allow_sensitive:
        return
    if isinstance(source, Mapping):
        if is_sensitive(source):
            name = source.get("name") or source.get("root") or "<manifest>"
            raise PermissionError(f"{name} is a sensitive shard set; only `flowrail privacy release` may read it "
                                  f"(refused for job '{job}')")
        return
    d = _local_dir(source)
    if d is None:
        return
    hits = _sensitive_manifests(d)
    if hits:
        raise PermissionError(f"{hits[0].parent} is a sensitive shard set; only `flowrail privacy release` may read "
                              f"it (refused for job '{job}')")
