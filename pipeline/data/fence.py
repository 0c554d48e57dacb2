"""The fence: the one check below every reader. A path a job reads is refused when it lands in a sensitive set.

A *fence* is a directory whose ``manifest.json`` says ``"sensitive": true`` (``flowrail privacy mark DIR``), with
everything below it. A local path is refused (one-line ``PermissionError``) when the path as written, or the path
with every symlink and ``..`` resolved (``os.path.realpath``), lies in a fence - whatever any manifest says. A shard
set is also refused when one of its immediate sub-directories is a fence, and a manifest may list only shards inside
its own directory. URLs are refused when they start with a prefix in the fence registry (one per line in
``$FLOWRAIL_FENCE_REGISTRY``, default ``~/.flowrail/fenced_prefixes``).

Readers call :func:`check_readable` (a shard set, a manifest, a tar pattern, a URL) or :func:`check_path` (one file);
:mod:`pipeline.data.shards` calls :func:`check_path` on every manifest and shard it opens, so a reader that forgets
its own check is still stopped. Only the privacy stage reads inside a fence, and only inside ``with inside(DIR):``
for the one fence it names (a context variable: it does not cross into other processes or threads).
:func:`copy_tree` copies without following links (a link anywhere in the source is refused).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

MANIFEST = "manifest.json"
SENSITIVE_KEY = "sensitive"
REGISTRY_ENV = "FLOWRAIL_FENCE_REGISTRY"

_INSIDE: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("flowrail_fence_inside", default=frozenset())


@contextlib.contextmanager
def inside(fence_dir: str | os.PathLike) -> Iterator[Path]:
    """Allow reads inside the one fence ``fence_dir`` (the privacy stage's own readers) for this block."""
    real = os.path.realpath(fence_dir)
    token = _INSIDE.set(_INSIDE.get() | {real})
    try:
        yield Path(real)
    finally:
        _INSIDE.reset(token)


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


_SEEN: dict[str, tuple[int, int, int, bool]] = {}  # manifest path -> (inode, size, mtime_ns, sensitive)


def _is_sensitive_manifest(m: Path) -> bool:
    """Whether ``m`` is a manifest saying ``"sensitive": true`` (parsed once per file version: a set's own manifest
    is met again for every shard it lists)."""
    try:
        st = os.stat(m)
    except OSError:
        return False
    if not os.path.isfile(m):
        return False
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _SEEN.get(str(m))
    if hit is not None and hit[:3] == key:
        return hit[3]
    try:
        data = json.loads(Path(m).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        data = None
    result = isinstance(data, dict) and is_sensitive(data)
    if len(_SEEN) > 4096:
        _SEEN.clear()
    _SEEN[str(m)] = (*key, result)
    return result


def fence_of(path: str | os.PathLike) -> Path | None:
    """The fence ``path`` lies in: a sensitive directory that is ``path`` or above it, for the path as written
    (made absolute) or with every link and ``..`` resolved; else None."""
    literal = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    for d in (literal, *literal.parents, real, *real.parents):
        if _is_sensitive_manifest(d / MANIFEST):
            return d
    return None


def _refuse(path: Any, fence: Path, job: str) -> PermissionError:
    return PermissionError(f"{fence} is a sensitive shard set; only `flowrail privacy release` may read it "
                           f"(refused {path} for job '{job}')")


def _allowed(fence: Path) -> bool:
    return os.path.realpath(fence) in _INSIDE.get()


def check_path(path: str | os.PathLike, job: str = "read") -> Path:
    """The resolved form of the local ``path`` a job is about to open; one-line ``PermissionError`` when it (as
    written or resolved) lies in a fence other than one entered with :func:`inside`."""
    fence = fence_of(path)
    if fence is not None and not _allowed(fence):
        raise _refuse(path, fence, job)
    real = Path(os.path.realpath(path))
    fence = fence_of(real)
    if fence is not None and not _allowed(fence):
        raise _refuse(path, fence, job)
    return real


def check_url(url: str, job: str) -> None:
    """Refuse a URL under a fenced prefix."""
    for prefix in fenced_prefixes():
        if url.startswith(prefix):
            raise PermissionError(f"{url} is under the fenced prefix {prefix} (registry {fence_registry()}); "
                                  f"only `flowrail privacy release` may read it (refused for job '{job}')")


def _local_dir(text: str) -> Path:
    p = Path(text)
    if p.is_dir():
        return p
    if p.suffix in (".json", ".tar") or "{" in p.name or "*" in p.name:
        return p.parent
    return p


def _check_confined(d: Path, job: str) -> None:
    """Every shard a manifest in ``d`` lists must be a file inside ``d`` (after resolving links), outside any fence."""
    m = d / MANIFEST
    try:
        data = json.loads(m.read_text()) if m.is_file() else None
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
        check_path(d / name, job)


def check_readable(source: str | os.PathLike | Mapping[str, Any], job: str, allow_sensitive: bool = False) -> None:
    """Refuse to let ``job`` read a sensitive shard set (one-line ``PermissionError``).

    ``source`` is a shard directory, a manifest path, a tar / brace pattern inside a shard directory, a URL, or an
    already loaded manifest dict. ``allow_sensitive`` is for the privacy stage, which must also be :func:`inside`
    the fence before :mod:`pipeline.data.shards` opens a file there.
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
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        check_url(text, job)
        return
    d = _local_dir(text)
    fence = fence_of(d)
    if fence is not None and not _allowed(fence):
        raise PermissionError(f"{fence} is a sensitive shard set; only `flowrail privacy release` may read it "
                              f"(refused for job '{job}')")
    try:
        subs = [c for c in d.iterdir() if c.is_dir() and _is_sensitive_manifest(c / MANIFEST)] if d.is_dir() else []
    except OSError:
        subs = []
    if subs and not _allowed(subs[0]):
        raise PermissionError(f"{subs[0]} is a sensitive shard set; only `flowrail privacy release` may read it "
                              f"(refused for job '{job}')")
    if d.is_dir():
        _check_confined(d, job)


def check_no_links(root: str | os.PathLike, what: str) -> None:
    """Refuse (one line) when ``root`` or anything below it is a symbolic link."""
    root = Path(root)
    if root.is_symlink():
        raise PermissionError(f"{what} {root} is a symbolic link; refused (copies and derived releases never follow "
                              f"links)")
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            p = Path(dirpath) / name
            if p.is_symlink():
                raise PermissionError(f"{what} {root} holds the symbolic link {p}; refused (copies and derived "
                                      f"releases never follow links)")


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, job: str = "copy") -> None:
    """Copy a directory tree that holds no link and lies in no fence (checked first; nothing followed)."""
    check_no_links(src, "source")
    for p in [Path(src), *Path(src).rglob("*")]:
        check_path(p, job)
    shutil.copytree(src, dst, symlinks=True)


def check_tree(root: str | os.PathLike, job: str) -> None:
    """Refuse (one line) a directory tree that is, holds, or links into a fence anywhere (links are followed for the
    check: a model folder from a cache of links is fine while every target lies outside the fences)."""
    check_path(root, job)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        for name in (*dirnames, *filenames):
            check_path(Path(dirpath) / name, job)
