"""Files on any filesystem pyarrow knows: local paths, ``file://``, ``s3://``, ``gs://``, ``hdfs://``...

A *location* is a local path or a URL. Remote filesystems are resolved by ``pyarrow.fs.FileSystem.from_uri`` from
the standard environment only (for S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_REGION``, ``AWS_ENDPOINT_URL`` for an S3-compatible server, or an instance role; for GCS: application default
credentials); flowrail never takes a credential in its config. An unreachable endpoint, a missing bucket, refused
credentials or a missing object become one :class:`~pipeline.errors.DataError` line naming the location.
"""
from __future__ import annotations

import functools
import hashlib
import os
import posixpath
from typing import Any, BinaryIO

from pipeline.errors import DataError


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URL of a non-local filesystem (``file://`` counts as local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike) -> str:
    text = str(location)
    return text[len("file://"):] if text.startswith("file://") else text


def join(location: str | os.PathLike, *names: str) -> str:
    """``location/name/...`` (URLs joined with ``/``, local paths with the OS separator)."""
    text = str(location)
    if is_remote(text):
        return posixpath.join(text.rstrip("/"), *names)
    return os.path.join(local_path(text), *names)


def parent(location: str | os.PathLike) -> str:
    text = str(location).rstrip("/")
    return text.rsplit("/", 1)[0] if is_remote(text) else os.path.dirname(local_path(text))


def storage_error(location: str, exc: BaseException, doing: str = "read") -> DataError:
    """One line naming ``location`` and what went wrong with the object store (endpoint, bucket, credentials)."""
    text = " ".join(str(exc).split())
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or ("bucket" in low and "not found" in low):
        why = "the bucket does not exist"
    elif any(s in low for s in ("accessdenied", "access denied", "access_denied", "invalidaccesskeyid",
                                "signaturedoesnotmatch", "forbidden", "http status 403", "credentials")):
        why = "access denied: check the credentials in the environment (AWS_ACCESS_KEY_ID, ...)"
    elif any(s in low for s in ("curlcode", "connection refused", "could not connect", "couldn't connect",
                                "network_connection", "resolve host", "timed out", "unreachable")):
        why = "the object store is unreachable (check AWS_ENDPOINT_URL / the network)"
    elif isinstance(exc, FileNotFoundError) or "not found" in low or "nosuchkey" in low:
        why = "not found"
    else:
        why = f"{type(exc).__name__}: {text[:200]}"
    return DataError(f"cannot {doing} {location}: {why}")


def _credential_environment() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "GCS_"))))


@functools.lru_cache(maxsize=16)
def _remote_filesystem(root: str, environment: tuple[tuple[str, str], ...]) -> Any:
    """One pyarrow filesystem per ``scheme://bucket`` and credential environment (creating one resolves the
    bucket's region: a request, too slow to repeat for each of a thousand shards)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(root)[0]


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """``(pyarrow filesystem, path inside it)`` for a location."""
    import pyarrow.fs as pafs

    text = str(location)
    if not is_remote(text):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(text))
    scheme, _, rest = text.partition("://")
    bucket = rest.split("/", 1)[0]
    try:
        fs = _remote_filesystem(f"{scheme}://{bucket}", _credential_environment())
    except (OSError, ValueError, TypeError) as exc:
        raise storage_error(text, exc, "open") from None
    return fs, rest.split("?", 1)[0].rstrip("/")


def exists(location: str | os.PathLike) -> bool:
    """Whether a file exists at ``location`` (a missing bucket or refused credentials raise, naming it)."""
    return file_sizes([str(location)])[0] is not None


def file_sizes(locations: list[str]) -> list[int | None]:
    """The size of each file (None where there is no file). Files sharing a folder are looked up with one listing
    of that folder (one request per 1,000 objects on S3) instead of one request per file."""
    import pyarrow.fs as pafs

    if not locations:
        return []
    fs, _ = filesystem(locations[0])
    inner = [filesystem(loc)[1] for loc in locations] if is_remote(locations[0]) else \
        [os.path.abspath(local_path(loc)) for loc in locations]
    folders: dict[str, int] = {}
    for path in inner:
        folder = path.rsplit("/", 1)[0]
        folders[folder] = folders.get(folder, 0) + 1
    sizes: dict[str, int | None] = {}
    try:
        for folder, count in folders.items():
            if count < 8:
                continue
            try:
                listed = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            except FileNotFoundError:
                listed = []
            sizes.update((info.path.rstrip("/"), info.size) for info in listed if info.type == pafs.FileType.File)
            sizes.update((p, sizes.get(p)) for p in inner if p.rsplit("/", 1)[0] == folder)
        rest = [p for p in inner if p not in sizes]
        for path, info in zip(rest, fs.get_file_info(rest) if rest else []):
            sizes[path] = info.size if info.type == pafs.FileType.File else None
    except (OSError, ValueError) as exc:
        raise storage_error(locations[0], exc) from None
    return [sizes[p] for p in inner]


def basename(location: str | os.PathLike) -> str:
    """The last component of a path or URL (``s3://b/digits/train`` -> ``train``)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_remote(location) else \
        os.path.basename(os.path.normpath(local_path(location)))


def subfolders(location: str | os.PathLike) -> list[str]:
    """The folders directly below ``location`` (on object stores: the key prefixes one level down), sorted;
    none when it does not exist. A missing bucket or refused credentials raise, naming ``location``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    try:
        listed = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise storage_error(str(location), exc) from None
    names = sorted(info.path.rstrip("/").rsplit("/", 1)[-1] for info in listed if info.type == pafs.FileType.Directory)
    return [join(location, name) for name in names]


def missing_bucket(location: str | os.PathLike) -> str | None:
    """The bucket of a remote ``location`` when that bucket does not exist (object stores report a missing
    bucket and a missing key alike as "not found"), else None."""
    import pyarrow.fs as pafs

    if not is_remote(location):
        return None
    fs, path = filesystem(location)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except (OSError, ValueError) as exc:
        raise storage_error(str(location), exc) from None
    return bucket if info.type == pafs.FileType.NotFound else None


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except (OSError, ValueError) as exc:
        raise storage_error(str(location), exc) from None


def open_input(location: str | os.PathLike) -> BinaryIO:
    """A seekable binary reader of the file at ``location``."""
    fs, path = filesystem(location)
    try:
        return fs.open_input_file(path)
    except (OSError, ValueError) as exc:
        raise storage_error(str(location), exc) from None


def make_dirs(location: str | os.PathLike) -> None:
    """Create a directory (a no-op on object stores, whose "directories" are key prefixes)."""
    if is_remote(location):
        return
    os.makedirs(local_path(location), exist_ok=True)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file; on a local disk atomically (temp file + rename), on an object store one PUT."""
    text = str(location)
    if not is_remote(text):
        path = local_path(text)
        tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return
    fs, path = filesystem(text)
    try:
        with fs.open_output_stream(path) as fh:
            fh.write(data)
    except (OSError, ValueError) as exc:
        raise storage_error(text, exc, "write") from None


class HashingWriter:
    """A write-only file object on any filesystem that computes the sha256 and size of what passes through it
    (``tarfile`` writes a shard into it; the manifest gets the digest without reading the shard back)."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.sha256 = hashlib.sha256()
        self.size = 0
        fs, path = filesystem(location)
        try:
            self._out = fs.open_output_stream(path) if is_remote(location) else open(path, "wb")
        except (OSError, ValueError) as exc:
            raise storage_error(location, exc, "write") from None

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        try:
            self._out.write(data)
        except (OSError, ValueError) as exc:
            raise storage_error(self.location, exc, "write") from None
        return len(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        try:
            self._out.close()
        except (OSError, ValueError) as exc:  # an object store uploads the last part here
            raise storage_error(self.location, exc, "write") from None


def sha256_of(location: str | os.PathLike) -> str:
    """The sha256 of a file on any filesystem, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except (OSError, ValueError) as exc:
        raise storage_error(str(location), exc) from None
    return digest.hexdigest()


def check_writable(location: str, what: str) -> None:
    """Before a job writes under a remote ``location`` (checkpoints, shards): the bucket exists, the endpoint
    answers and the credentials may write — one PUT and one DELETE of a small probe object, else one line naming
    ``what`` and the location. Local directories are left to the job (it creates them)."""
    if not is_remote(location):
        return
    bucket = missing_bucket(location)
    if bucket is not None:
        raise DataError(f"{what}={location}: bucket {bucket} does not exist")
    probe = join(location, ".flowrail-write-check")
    try:
        write_bytes(probe, b"ok")
        fs, path = filesystem(probe)
        fs.delete_file(path)
    except DataError as exc:
        raise DataError(f"{what}={location}: {str(exc).split(': ', 1)[-1]}") from None
    except (OSError, ValueError) as exc:
        why = storage_error(location, exc, "write").args[0].split(": ", 1)[-1]
        raise DataError(f"{what}={location}: {why}") from None
