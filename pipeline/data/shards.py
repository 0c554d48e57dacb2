"""Writing WebDataset tar shards and their manifest.

A shard set is a directory of ``shard-000000.tar`` files plus ``manifest.json`` with the sample count, the array
shape and dtype, the class count and the sha256 of every shard. One sample is ``<key>.<field>.npy`` (+ ``<key>.cls``).
Pixel sets store ``image.npy`` as uint8 HWC; latent sets store ``latent.npy`` as float CHW (already scaled).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from pipeline.errors import DataError

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_member(value: Any) -> bytes:
    """Bytes of one sample field: arrays as .npy, ints as text (.cls), str as utf-8, dicts as JSON."""
    if isinstance(value, np.ndarray):
        return _npy_bytes(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value)).encode()
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict):
        return json.dumps(value).encode()
    if isinstance(value, bytes):
        return value
    raise TypeError(f"cannot encode a {type(value).__name__} into a shard")


@dataclass
class ShardSetWriter:
    """Write samples (dicts of field -> value, field names with their extension) into rolling tar shards.

    Use as a context manager; ``close()`` writes ``manifest.json`` with ``extra`` merged in.
    """

    out_dir: Path
    samples_per_shard: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)
    _tar: tarfile.TarFile | None = None
    _shards: list[dict[str, Any]] = field(default_factory=list)
    _in_shard: int = 0
    _count: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard must be at least 1")

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _shard_path(self, index: int) -> Path:
        return self.out_dir / f"shard-{index:06d}.tar"

    def _roll(self) -> None:
        self._finish_shard()
        path = self._shard_path(len(self._shards))
        self._tar = tarfile.open(path, "w")
        self._shards.append({"name": path.name, "num_samples": 0})
        self._in_shard = 0

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            entry = self._shards[-1]
            entry["num_samples"] = self._in_shard
            entry["sha256"] = sha256_file(self.out_dir / entry["name"])

    def write(self, key: str, sample: dict[str, Any]) -> None:
        if self._tar is None or self._in_shard >= self.samples_per_shard:
            self._roll()
        assert self._tar is not None
        for name, value in sample.items():
            data = encode_member(value)
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(data)
            info.mtime = 0  # deterministic shards: same data, same sha256
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self._count += 1

    def close(self) -> dict[str, Any]:
        self._finish_shard()
        manifest = {
            "format": "flowrail-shards/1",
            "num_samples": self._count,
            "shards": self._shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sensitive": False,
            **self.extra,
        }
        (self.out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return manifest


def write_shard_set(out_dir: Path, samples: Iterable[tuple[str, dict[str, Any]]], *, samples_per_shard: int,
                    extra: dict[str, Any]) -> dict[str, Any]:
    """Write all ``(key, sample)`` pairs; returns the manifest."""
    writer = ShardSetWriter(Path(out_dir), samples_per_shard, dict(extra))
    for key, sample in samples:
        writer.write(key, sample)
    return writer.close()


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """The manifest of a shard directory (or a manifest path); a clear error when there is none."""
    path = Path(shard_dir)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise DataError(f"no shard set at {shard_dir}: {path.name} not found (make one with `flowrail shards ...`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"shard manifest {path} is not valid JSON ({exc.msg})") from None
    if not manifest.get("shards") or manifest.get("num_samples", 0) == 0:
        raise DataError(f"shard set {path.parent} is empty (0 samples)")
    return manifest


def shard_paths(shard_dir: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Absolute paths of the shards listed in the manifest, checking they exist."""
    base = Path(shard_dir)
    paths = []
    for entry in manifest["shards"]:
        path = base / entry["name"]
        if not path.is_file():
            raise DataError(f"shard {path} listed in the manifest is missing")
        paths.append(str(path))
    return paths


def verify_shards(shard_dir: str | Path) -> None:
    """Check every shard's sha256 against the manifest (a truncated or altered shard is named)."""
    manifest = read_manifest(shard_dir)
    for path, entry in zip(shard_paths(shard_dir, manifest), manifest["shards"]):
        if "sha256" in entry and sha256_file(Path(path)) != entry["sha256"]:
            raise DataError(f"shard {path} is corrupt: its sha256 does not match the manifest")


def iter_samples(shard_dir: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Plain single-process reading of a shard set (for small jobs and tests): ``(key, {field: value})``."""
    manifest = read_manifest(shard_dir)
    for path in shard_paths(shard_dir, manifest):
        try:
            with tarfile.open(path) as tar:
                current: str | None = None
                sample: dict[str, Any] = {}
                for member in tar:
                    key, _, name = member.name.partition(".")
                    if current is not None and key != current:
                        yield current, sample
                        sample = {}
                    current = key
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    sample[name] = decode_member(name, data)
                if current is not None:
                    yield current, sample
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"shard {path} is corrupt or truncated ({exc})") from None


def decode_member(name: str, data: bytes) -> Any:
    ext = name.rsplit(".", 1)[-1]
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext in ("cls", "cls2"):
        return int(data.decode())
    if ext in ("txt", "text"):
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    return data
