"""Shard-set verification that costs once per manifest, not once per start.

A set is *verified* when every shard's sha256 matches its manifest entry. The result is recorded next to the
manifest in ``verified.json``: ``{"manifest_sha256": sha256(manifest bytes), "sizes": [bytes of each shard]}``.
A start whose manifest hashes to the recorded value and whose shards still have the recorded sizes (one listing,
no reads) skips the check; a changed manifest (a shard rewritten, added or removed through the manifest) or a
shard of another size (truncated, replaced) is checked again. :class:`~pipeline.data.shards.ShardSetWriter`
records a set as verified when it writes it (the digests are taken from the bytes as they are written). The check
itself runs as parallel Ray tasks (each hashes a slice of the shards, streaming 1 MiB chunks), serially only when
Ray is not running.

What the cache does not cover: a shard altered in place to the same size without touching its manifest. Such a
shard is still named in one line when a training worker fails to parse it
(:func:`pipeline.data.streaming.name_bad_shard`).
"""
from __future__ import annotations

import math
from typing import Callable

from pipeline.data import storage
from pipeline.data.shards import manifest_location, parse_manifest, read_manifest_bytes, shard_paths
from pipeline.data.verified_record import VERIFIED, manifest_digest, read_record, write_record
from pipeline.errors import DataError

__all__ = ["VERIFIED", "describe_cache", "ensure_verified", "is_recorded", "manifest_digest", "record_verified"]


def record_verified(shard_dir: str, manifest_bytes: bytes, sizes: list[int | None] | None = None) -> bool:
    """Record that the set with this manifest (and these shard sizes) is verified; False (and nothing else) if the
    set is read-only."""
    base, _ = manifest_location(shard_dir)
    if sizes is None:
        sizes = storage.file_sizes(shard_paths(shard_dir, parse_manifest(manifest_bytes, shard_dir)))
    return write_record(base, manifest_bytes, sizes)


def is_recorded(shard_dir: str, manifest_bytes: bytes, sizes: list[int | None]) -> bool:
    """Whether ``verified.json`` records exactly this manifest and these shard sizes."""
    record = read_record(manifest_location(shard_dir)[0])
    return record.get("manifest_sha256") == manifest_digest(manifest_bytes) and record.get("sizes") == sizes


def bad_shards(pairs: list[tuple[str, str]]) -> list[str]:
    """The paths among ``(path, expected sha256)`` whose content hashes differently (or cannot be read)."""
    bad = []
    for path, expected in pairs:
        try:
            if storage.sha256_of(path) != expected:
                bad.append(path)
        except DataError:
            bad.append(path)
    return bad


def _check_parallel(pairs: list[tuple[str, str]], tasks: int) -> list[str]:
    import ray

    remote = ray.remote(num_cpus=0.5, max_retries=1)(bad_shards)
    size = math.ceil(len(pairs) / tasks)
    refs = [remote.remote(pairs[i:i + size]) for i in range(0, len(pairs), size)]
    return [path for found in ray.get(refs) for path in found]


def ensure_verified(shard_dir: str, *, parallel: bool | None = None,
                    start_ray: Callable[[], None] | None = None) -> str:
    """Verify the set unless ``verified.json`` records its current manifest; returns ``"cached"`` or
    ``"verified"``. A corrupt shard raises one :class:`DataError` line naming it (and the count of others).

    ``start_ray``: called only when there is something to check, to start/connect Ray for the parallel check."""
    data = read_manifest_bytes(shard_dir)
    manifest = parse_manifest(data, shard_dir)
    paths = shard_paths(shard_dir, manifest)  # confined to the set, and present
    sizes = storage.file_sizes(paths)
    if is_recorded(shard_dir, data, sizes):
        return "cached"
    pairs = [(path, entry["sha256"]) for path, entry in zip(paths, manifest["shards"])
             if isinstance(entry, dict) and "sha256" in entry]
    if start_ray is not None and parallel is not False and len(pairs) > 1:
        start_ray()
    if parallel is None:
        import ray

        parallel = ray.is_initialized() and len(pairs) > 1
    if parallel:
        import ray

        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        bad = _check_parallel(pairs, min(len(pairs), 4 * cpus))
    else:
        bad = bad_shards(pairs)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"shard {bad[0]} is corrupt: its sha256 does not match the manifest{more}")
    record_verified(shard_dir, data, sizes)
    return "verified"


def describe_cache(shard_dir: str) -> dict[str, object]:
    """For tests and tools: the recorded verification of a set, or {}."""
    return read_record(manifest_location(shard_dir)[0])
