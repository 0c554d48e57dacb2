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
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator

import numpy as np

from pipeline.data import storage
from pipeline.data.verified_record import write_record
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

    ``out_dir`` is a local directory or a URL (``s3://bucket/prefix``, see :mod:`pipeline.data.storage`). Each
    shard's sha256 is computed while it is written, so a new set is verified as written: ``close()`` writes
    ``manifest.json`` (with ``extra`` merged in) and records it as verified (:mod:`pipeline.data.verify`).
    Use as a context manager.
    """

    out_dir: str | Path
    samples_per_shard: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)
    _tar: tarfile.TarFile | None = None
    _out: Any = None
    _shards: list[dict[str, Any]] = field(default_factory=list)
    _sizes: list[int | None] = field(default_factory=list)
    _in_shard: int = 0
    _count: int = 0

    def __post_init__(self) -> None:
        if not storage.is_remote(self.out_dir):
            self.out_dir = Path(storage.local_path(self.out_dir))
        storage.make_dirs(self.out_dir)
        bucket = storage.missing_bucket(self.out_dir)
        if bucket is not None:
            raise DataError(f"cannot write shards to {self.out_dir}: bucket {bucket} does not exist")
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard must be at least 1")

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _roll(self) -> None:
        self._finish_shard()
        name = f"shard-{len(self._shards):06d}.tar"
        self._out = storage.HashingWriter(storage.join(self.out_dir, name))
        self._tar = tarfile.open(fileobj=self._out, mode="w")
        self._shards.append({"name": name, "num_samples": 0})
        self._in_shard = 0

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()  # end-of-archive blocks, then the file itself
            self._out.close()
            self._tar = None
            entry = self._shards[-1]
            entry["num_samples"] = self._in_shard
            entry["sha256"] = self._out.sha256.hexdigest()
            self._sizes.append(self._out.size)

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
        text = json.dumps(manifest, indent=2).encode()
        storage.write_bytes(storage.join(self.out_dir, MANIFEST), text)
        write_record(str(self.out_dir), text, self._sizes)  # every shard's digest was taken as it was written
        return manifest


def write_shard_set(out_dir: str | Path, samples: Iterable[tuple[str, dict[str, Any]]], *, samples_per_shard: int,
                    extra: dict[str, Any]) -> dict[str, Any]:
    """Write all ``(key, sample)`` pairs; returns the manifest."""
    writer = ShardSetWriter(out_dir, samples_per_shard, dict(extra))
    for key, sample in samples:
        writer.write(key, sample)
    return writer.close()


def manifest_location(shard_dir: str | Path) -> tuple[str, str]:
    """``(set directory, manifest file)`` of a shard directory or a manifest path, local or URL."""
    text = str(shard_dir).rstrip("/") if storage.is_remote(shard_dir) else str(shard_dir)
    if text.endswith(".json"):
        return storage.parent(text), text
    if not storage.is_remote(text) and Path(storage.local_path(text)).is_file():
        return str(Path(storage.local_path(text)).parent), text
    return text, storage.join(text, MANIFEST)


def read_manifest_bytes(shard_dir: str | Path) -> bytes:
    """The manifest file's bytes (what the verification cache is keyed by); one line when there is none."""
    _, path = manifest_location(shard_dir)
    _fenced(path)
    if not storage.exists(path):
        bucket = storage.missing_bucket(path)
        if bucket is not None:
            raise DataError(f"no shard set at {shard_dir}: bucket {bucket} does not exist")
        raise DataError(f"no shard set at {shard_dir}: {MANIFEST if path.endswith(MANIFEST) else path} not found "
                        "(make one with `flowrail shards ...`)")
    return storage.read_bytes(path)


def parse_manifest(data: bytes, where: str | Path) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"shard manifest {where} is not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(manifest, dict) or not manifest.get("shards") or manifest.get("num_samples", 0) == 0:
        raise DataError(f"shard set {where} is empty (0 samples)")
    return manifest


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """The manifest of a shard directory (or a manifest path), local or URL; a clear error when there is none."""
    return parse_manifest(read_manifest_bytes(shard_dir), manifest_location(shard_dir)[1])


def _fenced(location: str | Path) -> None:
    """The fence check of every file this module opens: a local path that lands in a sensitive set (as written or
    with links resolved) or a URL under a fenced prefix is refused (:mod:`pipeline.data.fence`)."""
    from pipeline.data.fence import check_path, check_url

    if storage.is_remote(location):
        check_url(str(location), "read")
    else:
        check_path(storage.local_path(location))


def confined_name(name: Any, shard_dir: str | Path) -> str:
    """A manifest's shard name, checked to stay inside the set: a relative path without ``..``, not absolute,
    not a URL (so a manifest cannot make a job read ``../other/x.tar`` or ``/etc/hostname``)."""
    text = str(name) if isinstance(name, str) else ""
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if (not text or "://" in text or text.startswith(("/", "~")) or PureWindowsPath(text).drive
            or ".." in parts or "\\" in text):
        raise DataError(f"shard set {shard_dir}: manifest names shard {name!r} outside its own directory (refused)")
    return text


def shard_paths(shard_dir: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Paths (or URLs) of the shards listed in the manifest, confined to the set and checked to exist."""
    base, _ = manifest_location(shard_dir)
    paths = [storage.join(base, confined_name(entry.get("name") if isinstance(entry, dict) else None, shard_dir))
             for entry in manifest["shards"]]
    for path in paths:
        _fenced(path)
    for path, size in zip(paths, storage.file_sizes(paths)):
        if size is None:
            raise DataError(f"shard {path} listed in the manifest is missing")
    return paths


def verify_shards(shard_dir: str | Path) -> None:
    """Check every shard's sha256 against the manifest (a truncated or altered shard is named); serial, no cache.
    Training uses :func:`pipeline.data.verify.ensure_verified` (parallel, cached by the manifest's hash)."""
    manifest = read_manifest(shard_dir)
    for path, entry in zip(shard_paths(shard_dir, manifest), manifest["shards"]):
        if "sha256" in entry and storage.sha256_of(path) != entry["sha256"]:
            raise DataError(f"shard {path} is corrupt: its sha256 does not match the manifest")


def iter_samples(shard_dir: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Plain single-process reading of a shard set (for small jobs and tests): ``(key, {field: value})``."""
    manifest = read_manifest(shard_dir)
    for path in shard_paths(shard_dir, manifest):
        try:
            with storage.open_input(path) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
                current: str | None = None
                sample: dict[str, Any] = {}
                for member in tar:
                    key, _, name = member.name.partition(".")
                    if current is not None and key != current:
                        yield current, sample
                        sample = {}
                    current = key
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    sample[name] = decode_member(name, data, key, path)
                if current is not None:
                    yield current, sample
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"shard {path} is corrupt or truncated ({exc})") from None


def decode_member(name: str, data: bytes, key: str = "?", url: str = "?") -> Any:
    """One member decoded without unpickling (encoded images stay bytes); a pickle/torch member is refused
    (:mod:`pipeline.data.safe_decode`)."""
    from pipeline.data.safe_decode import IMAGE_EXTENSIONS, check_member, decode_value, extension

    check_member(name, key, url)
    return data if extension(name) in IMAGE_EXTENSIONS else decode_value(name, data)
