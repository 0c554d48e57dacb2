"""Ray Data streaming of a shard set into training workers.

``read_webdataset`` → decode (uint8 HWC → float CHW in [-1, 1], optional bilinear resize; latents pass through).
Shard sets written by flowrail (manifest ``"format": "flowrail-shards/1"``) take the faster
:mod:`pipeline.data.tar_reader` instead: same columns, same bad-sample policy.

Training reads a deterministic stream per (seed, epoch, rank) — see :func:`epoch_dataset` — so that a run resumed
from a checkpoint sees exactly the batches an uninterrupted run would have seen. Ray Data's ``streaming_split``
hands blocks to whichever worker asks first ("OutputSplitter does not provide any ordering guarantees"), so the
training workers do not use it: each worker reads its own files of the epoch's seeded file permutation, in order
(``preserve_order``), shuffled in seeded windows of whole files (:mod:`pipeline.data.epoch_stream`) so that a
resumed epoch starts reading at the file it stopped in. Each worker's Ray Data executor gets an explicit resource
budget beside the training workers (:mod:`pipeline.data.read_budget`).
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.data import storage
from pipeline.data.epoch_stream import StreamPosition
from pipeline.data.pixels import hwc_to_chw, to_model_pixels
from pipeline.data.read_budget import ReadBudget
from pipeline.data.safe_decode import refuse_unsafe
from pipeline.data.shards import read_manifest, shard_paths
from pipeline.errors import DataError, first_line


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data."""

    kind: str  # "pixels" or "latents"
    field: str  # the shard member holding the array, e.g. "image.npy"
    channels: int
    size: int  # spatial size after resizing (square)
    num_classes: int
    num_samples: int
    latent_scale: float | None = None
    vae: str | None = None  # for latent sets: the autoencoder folder that decodes them
    cond_fields: dict[str, list[int]] | None = None  # extra float arrays per sample (FLUX: "t5.npy": [L, D], ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(shards: str, image_size: int | None, job: str = "train") -> tuple[list[str], DataInfo]:
    """Validate a shard set for ``job`` and return its shard paths and :class:`DataInfo`."""
    from pipeline.data.fence import check_readable

    check_readable(shards, job=job)  # before anything else reads it; names the directory
    manifest = read_manifest(shards)
    if storage.is_remote(shards):  # no local directory to look around: the manifest itself says
        check_readable({**manifest, "name": manifest.get("name") or str(shards)}, job=job)
    channels, height, width = manifest["shape"]
    if height != width:
        raise DataError(f"shard set {shards} holds {height}x{width} images; flowrail trains on square images")
    kind = manifest.get("kind", "pixels")
    size = height if (image_size is None or kind == "latents") else image_size
    info = DataInfo(kind=kind, field=manifest.get("field", "image.npy"), channels=channels, size=size,
                    num_classes=int(manifest.get("num_classes", 0)), num_samples=int(manifest["num_samples"]),
                    latent_scale=manifest.get("latent_scale"), vae=manifest.get("vae"),
                    cond_fields=manifest.get("cond_fields"))
    return shard_paths(shards, manifest), info


class Decode:
    """A batch of raw samples → ``{"image": float32 (B, C, H, W), "label": int64 (B,)}``.

    Pixels: ``x = u8 / 127.5 - 1``; resized bilinearly (antialiased) when the stored size differs.
    Samples with a wrong shape, a missing field or non-finite values are skipped and counted (policy ``skip``)
    or raise a one-line :class:`DataError` naming the sample (policy ``fail``).
    """

    def __init__(self, info: DataInfo, policy: str = "skip", uint8_size: int | None = None,
                 file_index: Any = None) -> None:
        self.info = info
        self.policy = policy
        # pixels stay uint8 (B, C, H, W) at their stored size (this); the worker converts and resizes (pipeline.data.pixels)
        self.uint8_size = uint8_size
        self.file_index = file_index  # an epoch_stream.FileIndex: adds each sample's file position (column "file")

    def _bad(self, key: str, url: str, why: str) -> None:
        if self.policy == "fail":
            raise DataError(f"sample {key} in {url}: {why}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        info = self.info
        keys = batch.get("__key__", np.array(["?"] * len(next(iter(batch.values())))))
        urls = batch.get("__url__", np.array(["?"] * len(keys)))
        arrays, labels = batch.get(info.field), batch.get("cls")
        good_x, good_y, good_urls, skipped = [], [], [], 0
        good_c: dict[str, list[np.ndarray]] = {}
        for i in range(len(keys)):
            x = None if arrays is None else arrays[i]
            if x is None or (isinstance(x, float) and np.isnan(x)):
                self._bad(keys[i], urls[i], f"missing field '{info.field}'")
                skipped += 1
                continue
            if isinstance(x, (bytes, bytearray, np.bytes_)):  # undecoded member (read with decoder=False)
                try:
                    x = np.load(io.BytesIO(bytes(x)), allow_pickle=False)
                except (ValueError, OSError, EOFError) as exc:
                    self._bad(keys[i], urls[i], f"'{info.field}' is not a valid .npy array ({str(exc)[:80]})")
                    skipped += 1
                    continue
            x = np.asarray(x)
            if info.kind == "pixels":
                expected = (x.shape[0], x.shape[0], info.channels)
                ok = x.ndim == 3 and x.shape == expected
            else:
                ok = x.ndim == 3 and x.shape[0] == info.channels and x.shape[1] == x.shape[2] == info.size
            if not ok:
                self._bad(keys[i], urls[i], f"array of shape {x.shape} does not match the manifest")
                skipped += 1
                continue
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                self._bad(keys[i], urls[i], "array holds NaN or Inf values")
                skipped += 1
                continue
            label = -1 if labels is None else labels[i]
            if isinstance(label, (bytes, bytearray, np.bytes_)):
                try:
                    label = int(bytes(label).decode())
                except ValueError:
                    self._bad(keys[i], urls[i], f"label {bytes(label)[:20]!r} is not an integer")
                    skipped += 1
                    continue
            conds = self._conditioning(batch, i)
            if conds is None:
                self._bad(keys[i], urls[i], f"conditioning fields {list(info.cond_fields or {})} missing or of the "
                                            "wrong shape")
                skipped += 1
                continue
            for name, value in conds.items():
                good_c.setdefault(name, []).append(value)
            good_x.append(x)
            good_urls.append(str(urls[i]))
            good_y.append(int(label) if label is not None and label == label else -1)
        files = {} if self.file_index is None else {"file": self.file_index.column(good_urls, [1] * len(good_urls))}
        if not good_x:
            raw = self.uint8_size is not None and info.kind == "pixels"
            size = self.uint8_size if raw else info.size
            out_shape = (0, info.channels, size, size)
            return {**files, "image": np.zeros(out_shape, np.uint8 if raw else np.float32), "label": np.zeros(0, np.int64),
                    **{f.removesuffix(".npy"): np.zeros((0, *shape), np.float32)
                       for f, shape in (info.cond_fields or {}).items()},
                    "skipped": np.zeros(0, np.int64)}
        stacked = np.stack(good_x)
        if info.kind == "pixels" and self.uint8_size is not None and stacked.dtype == np.uint8:
            images = hwc_to_chw(stacked)
        elif info.kind == "pixels":
            images = to_model_pixels(torch.from_numpy(hwc_to_chw(stacked)), info.size).numpy()
        else:
            images = stacked.astype(np.float32, copy=False)
        count = np.zeros(len(good_x), np.int64)
        count[0] = skipped
        conds = {f.removesuffix(".npy"): np.stack(good_c[f]) for f in (info.cond_fields or {})}
        return {"image": images, "label": np.asarray(good_y, np.int64), "skipped": count, **conds, **files}

    def _conditioning(self, batch: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray] | None:
        """The per-sample conditioning arrays named in the manifest (e.g. FLUX text embeddings), or None if bad."""
        out = {}
        for name, shape in (self.info.cond_fields or {}).items():
            column = batch.get(name)
            value = None if column is None else column[i]
            if isinstance(value, (bytes, bytearray, np.bytes_)):
                try:
                    value = np.load(io.BytesIO(bytes(value)), allow_pickle=False)
                except (ValueError, OSError, EOFError):
                    return None
            if value is None or np.shape(value) != tuple(shape):
                return None
            out[name] = np.asarray(value, np.float32)
        return out


def epoch_files(paths: list[str], *, seed: int, epoch: int, rank: int, world: int) -> list[str]:
    """This rank's shard files for ``epoch``: a permutation seeded by ``(seed, epoch)``, files ``rank::world``.

    Every rank computes the same permutation, so the ranks' file sets are disjoint and cover the shard set.
    With fewer files than ranks every rank gets all files and keeps every ``world``-th batch (:func:`batch_stride`).
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(paths))
    if len(paths) < world:
        return [paths[i] for i in order]
    return [paths[i] for i in order[rank::world]]


def batch_stride(num_files: int, world: int) -> int:
    """1 when each rank reads its own files; ``world`` when all ranks read all files and take turns by batch."""
    return world if num_files < world else 1


def epoch_dataset(paths: list[str], info: DataInfo, *, policy: str, seed: int, epoch: int, rank: int,
                  world: int, start_file: int = 0, budget: ReadBudget | None = None,
                  file_column: bool = False) -> tuple[Any, list[str]]:
    """A Ray Dataset of this rank's decoded samples for ``epoch`` in a deterministic order, and the files it reads.

    Determinism: the files are fixed by (seed, epoch, rank); ``DataContext.execution_options.preserve_order``
    makes Ray Data emit blocks in file order whatever the order its read tasks finish in. ``start_file``: read the
    rank's files from that one on (a resumed epoch). ``budget``: this rank's Ray Data resource limits
    (:mod:`pipeline.data.read_budget`; ``None``: Ray Data's defaults). ``file_column``: add each sample's index in
    the rank's file list (column ``file``, for :mod:`pipeline.data.epoch_stream`).
    """
    import ray.data

    from pipeline.data.epoch_stream import FileIndex
    from pipeline.data.read_budget import apply_budget
    from pipeline.data.tar_reader import is_flowrail_shards, read_shards

    all_files = epoch_files(paths, seed=seed, epoch=epoch, rank=rank, world=world)
    files = all_files[start_file:]
    index = FileIndex(files, first=start_file) if file_column else None
    num_cpus = budget.task_cpus if budget is not None else None
    # pixels cross Ray's object store as uint8 at their stored size (a set of one known size); the worker converts them
    # to floats and resizes to data.image_size (pipeline.data.pixels.model_batch)
    raw = stored_size(all_files) if info.kind == "pixels" else None
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # a new stream per epoch: its bars would flood the training log
    apply_budget(budget)
    if not info.cond_fields and is_flowrail_shards(all_files):  # flowrail's own shards: parsed in memory, one copy per shard (tar_reader)
        return read_shards(files, info, policy, uint8_size=raw, file_index=index, num_cpus=num_cpus), files
    ctx.enable_tensor_extension_casting = False  # a sample missing its array must not fail its whole block
    # refuse_unsafe: members stay bytes and Decode parses them (np.load without pickles), so a sample with a missing
    # or garbled member is one bad sample under data.bad_sample_policy instead of a failed read of the whole block;
    # a pickle/torch member refuses the shard (pipeline.data.safe_decode)
    ds = ray.data.read_webdataset(files, shuffle=None, decoder=refuse_unsafe, num_cpus=num_cpus)
    # whole blocks: the read and the decode fuse into one task (a batch_size would keep them apart, see tar_reader)
    ds = ds.map_batches(Decode(info, policy, uint8_size=raw, file_index=index), batch_format="numpy",
                        batch_size=None, zero_copy_batch=True, num_cpus=num_cpus)
    return ds, files


def epoch_stream(paths: list[str], info: DataInfo, *, policy: str, seed: int, epoch: int, rank: int, world: int,
                 batch_size: int, shuffle_buffer: int, start: StreamPosition | None = None,
                 budget: ReadBudget | None = None) -> tuple[Iterator[tuple[dict[str, np.ndarray], StreamPosition]],
                                                            list[str]]:
    """This rank's numpy batches of ``epoch`` with the stream position after each, and the files read.

    Batches come from :func:`pipeline.data.epoch_stream.windowed_batches` over :func:`epoch_dataset`; a ``start``
    position reads only the files from its window on. With fewer files than ranks every rank reads every file
    and keeps the stream batches ``i`` with ``i % world == rank`` (:func:`batch_stride`).
    """
    from pipeline.data.epoch_stream import files_per_window, windowed_batches

    start = start or StreamPosition()
    stride = batch_stride(len(paths), world)
    per_window = files_per_window(shuffle_buffer, info.num_samples / max(len(paths), 1))
    ds, files = epoch_dataset(paths, info, policy=policy, seed=seed, epoch=epoch, rank=rank, world=world,
                              start_file=start.window * per_window, budget=budget, file_column=True)
    blocks = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
    stream = windowed_batches(blocks, batch_size=batch_size, per_window=per_window, seed=seed, epoch=epoch,
                              rank_key=rank if stride == 1 else 0, shuffle=shuffle_buffer > 0, start=start)
    return ((b, p) for b, p in stream if (p.batches - 1) % stride == rank % stride), files


def stored_size(files: list[str]) -> int | None:
    """The stored (square) image size of the set holding ``files``, from its manifest's ``shape`` (None if unknown)."""
    import json

    if not files:
        return None
    try:
        shape = json.loads(storage.read_bytes(storage.join(storage.parent(files[0]), "manifest.json"))).get("shape")
        return int(shape[-1]) if shape and int(shape[-1]) == int(shape[-2]) else None
    except (DataError, OSError, ValueError, TypeError, AttributeError, IndexError):
        return None


def check_tar(path: str) -> str | None:
    """Why the tar shard at ``path`` is damaged, or None when it reads to its end and its arrays decode.

    Python's tarfile treats a header cut short after the first member as the end of the archive, so truncation is
    also detected by the missing end-of-archive marker (two zero blocks) that every shard writer emits.
    """
    import io
    import tarfile

    try:
        with storage.open_input(path) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if member.name.endswith(".npy"):
                        np.load(io.BytesIO(data), allow_pickle=False)
        with storage.open_input(path) as fh:
            size = fh.size()
            fh.seek(max(0, size - 1024))
            tail = fh.read()
        if size % 512 or tail.strip(b"\0"):
            return "no end-of-archive marker: the file is truncated"
    except DataError as exc:
        return str(exc)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {first_line(exc, 120)}" if str(exc).strip() else type(exc).__name__
    return None


def name_bad_shard(files: list[str], exc: BaseException) -> DataError:
    """Turn a failure while streaming ``files`` into a one-line :class:`DataError` naming the bad shard."""
    import re

    for path in files:
        why = check_tar(path)
        if why is not None:
            return DataError(f"shard {path} is corrupt or truncated ({why})")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception):", ln)]
    first = (errors or lines or [type(exc).__name__])[-1]
    return DataError(f"reading shards {', '.join(files)} failed: {first[:300]}")


def build_dataset(shards: str, *, image_size: int | None, job: str = "train", policy: str = "skip",
                  shuffle_files: bool = True) -> tuple[Any, DataInfo]:
    """A streaming Ray Dataset of decoded samples, and its :class:`DataInfo`."""
    import ray

    from pipeline.data.tar_reader import is_flowrail_shards, read_shards

    paths, info = describe(shards, image_size, job)
    if not info.cond_fields and is_flowrail_shards(paths):  # flowrail's own shards: parsed in memory, one copy per shard (tar_reader)
        return read_shards(paths, info, policy, shuffle_files=shuffle_files), info
    ds = ray.data.read_webdataset(paths, shuffle="files" if shuffle_files else None, decoder=refuse_unsafe)
    ds = ds.map_batches(Decode(info, policy), batch_format="numpy", batch_size=256, zero_copy_batch=True)
    return ds, info
