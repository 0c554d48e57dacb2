"""The privacy boundary: which shard sets are sensitive, and who may read them.

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

MANIFEST = "manifest.json"
SENSITIVE_KEY = "sensitive"
REGISTRY_ENV = "FLOWRAIL_FENCE_REGISTRY"


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


def fence_registry() -> Path:
    """The file listing fenced URL prefixes (one per line)."""
    return Path(os.environ.get(REGISTRY_ENV) or Path.home() / ".flowrail" / "fenced_prefixes")


def fenced_prefixes() -> list[str]:
    path = fence_registry()
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


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
    return p if p.exists() else p


def _is_sensitive_manifest(m: Path) -> bool:
    if not m.is_file():
        return False
    try:
        data = json.loads(m.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and is_sensitive(data)


def fence_of(path: str | os.PathLike) -> Path | None:
    """The sensitive shard directory whose fence ``path`` lies in: ``path`` itself or any directory above it up to
    the filesystem root (symlinks resolved), else None."""
    p = Path(path).absolute()
    for d in [p, *p.parents, *Path(os.path.realpath(p)).parents, Path(os.path.realpath(p))]:
        if _is_sensitive_manifest(d / MANIFEST):
            return d
    return None


def _sensitive_manifests(d: Path) -> list[Path]:
    """Sensitive manifests in ``d``, any directory above it, or its immediate sub-directories."""
    fence = fence_of(d)
    found = [fence / MANIFEST] if fence is not None else []
    try:
        found += [c / MANIFEST for c in d.iterdir() if c.is_dir() and _is_sensitive_manifest(c / MANIFEST)]
    except OSError:
        pass
    return found


def _check_confined(d: Path, job: str) -> None:
    """Every shard a manifest in ``d`` lists must be a file inside ``d`` (after resolving links) and outside any
    fence."""
    m = d / MANIFEST
    if not m.is_file():
        return
    try:
        data = json.loads(m.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return  # the reader's own manifest check names the problem
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, list):
        return
    root = Path(os.path.realpath(d))
    for entry in shards:
        name = str(entry.get("name", "")) if isinstance(entry, dict) else str(entry)
        target = Path(os.path.realpath(d / name))
        if Path(name).is_absolute() or ".." in Path(name).parts or root not in target.parents:
            raise PermissionError(f"{m} lists shard '{name}' outside its directory; manifests may only name "
                                  f"shards inside {d} (refused for job '{job}')")
        fence = fence_of(target)
        if fence is not None:
            raise PermissionError(f"{m} lists shard '{name}' inside the sensitive shard set {fence}; only "
                                  f"`flowrail privacy release` may read it (refused for job '{job}')")


def check_readable(source: str | os.PathLike | Mapping[str, Any], job: str, allow_sensitive: bool = False) -> None:
    """Refuse to let ``job`` read a sensitive shard set.

    ``source`` is a shard directory, a manifest path, a tar / brace pattern inside a shard directory, a URL, or an
    already loaded manifest dict. Raises ``PermissionError`` (one line) unless ``allow_sensitive`` — which only
    the privacy stage's own readers pass.
    """
    if allow_sensitive:
        return
    if isinstance(source, Mapping):
        if is_sensitive(source):
            name = source.get("name") or source.get("root") or "<manifest>"
            raise PermissionError(f"{name} is a sensitive shard set; only `flowrail privacy release` may read it "
                                  f"(refused for job '{job}')")
        return
    text = str(source)
    if "://" in text and not text.startswith("file://"):
        for prefix in fenced_prefixes():
            if text.startswith(prefix):
                raise PermissionError(f"{text} is under the fenced prefix {prefix} (registry {fence_registry()}); "
                                      f"only `flowrail privacy release` may read it (refused for job '{job}')")
        return
    d = _local_dir(source)
    if d is None:
        return
    hits = _sensitive_manifests(d)
    if hits:
        raise PermissionError(f"{hits[0].parent} is a sensitive shard set; only `flowrail privacy release` may read "
                              f"it (refused for job '{job}')")
    if d.is_dir():
        _check_confined(d, job)
