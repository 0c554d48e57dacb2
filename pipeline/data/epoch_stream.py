"""One rank's batches of one epoch, shuffled in windows of whole files so that a resume can start mid-epoch.

The rank's files of the epoch (``pipeline.data.streaming.epoch_files``) are cut into windows of ``W`` consecutive
files, ``W = ceil(data.shuffle_buffer / samples per file)`` (1 when shuffling is off). Window ``w``'s good samples,
in file order, are permuted by ``default_rng([seed, epoch, rank_key, w])``; the windows follow each other and the
stream is cut into batches of ``batch_size`` (a batch may span two windows; an incomplete last batch is dropped).

Every batch carries the :class:`StreamPosition` after it: windows fully consumed, samples of the next window
consumed, stream batches emitted. Because a window's order depends only on its own files, a stream started at a
position — reading only the files from window ``position.window`` on and dropping ``position.offset`` samples of
that window's permutation — yields exactly the batches the uninterrupted stream yields after that position.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

FILE_COLUMN = "file"  # each sample's index in the rank's file list of the epoch (added by the readers)


class StreamPosition(NamedTuple):
    window: int = 0  # windows of the epoch's file list fully consumed
    offset: int = 0  # samples of window ``window`` already consumed (in its permuted order)
    batches: int = 0  # stream batches already emitted (the index of the next batch)


def files_per_window(shuffle_buffer: int, samples_per_file: float) -> int:
    """Files per shuffle window: enough whole files to hold ``shuffle_buffer`` samples; 1 when it is 0."""
    if shuffle_buffer <= 0:
        return 1
    return max(1, math.ceil(shuffle_buffer / max(samples_per_file, 1.0)))


def window_order(n: int, *, seed: int, epoch: int, rank_key: int, window: int, shuffle: bool) -> np.ndarray:
    """The order of window ``window``'s ``n`` samples: a permutation seeded by (seed, epoch, rank_key, window)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, rank_key, window]).permutation(n)


def _windows(blocks: Iterable[dict[str, np.ndarray]], per_window: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(window index, its samples in file order), from blocks in file order holding a :data:`FILE_COLUMN`.
    A window with no good sample (all its files bad or empty) is not emitted."""
    current: int | None = None
    parts: list[dict[str, np.ndarray]] = []

    def joined() -> dict[str, np.ndarray]:
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    for block in blocks:
        files = np.asarray(block[FILE_COLUMN])
        if not len(files):
            continue
        windows = files // per_window
        cuts = np.flatnonzero(np.diff(windows)) + 1
        for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(files)]):
            w = int(windows[start])
            if current is not None and w != current:
                yield current, joined()
                parts = []
            current = w
            parts.append({k: np.asarray(v)[start:stop] for k, v in block.items()})
    if parts and current is not None:
        yield current, joined()


def windowed_batches(blocks: Iterable[dict[str, np.ndarray]], *, batch_size: int, per_window: int, seed: int,
                     epoch: int, rank_key: int, shuffle: bool, start: StreamPosition = StreamPosition()
                     ) -> Iterator[tuple[dict[str, np.ndarray], StreamPosition]]:
    """Batches of ``batch_size`` samples and the position after each (see the module docstring).

    ``blocks``: the decoded samples of the files from window ``start.window`` on, in file order, with
    :data:`FILE_COLUMN` counted from the start of the epoch's file list. ``start.offset`` samples of the first
    window are dropped; batches are counted from ``start.batches``.
    """
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    batches = start.batches
    for w, samples in _windows(blocks, per_window):
        if w < start.window:
            continue
        n = len(samples[FILE_COLUMN])
        order = window_order(n, seed=seed, epoch=epoch, rank_key=rank_key, window=w, shuffle=shuffle)
        skip = start.offset if w == start.window else 0
        columns = {k: v[order[skip:]] for k, v in samples.items() if k != FILE_COLUMN}
        used = skip
        while used < n:
            take = min(batch_size - held, n - used)
            pending.append({k: v[used - skip:used - skip + take] for k, v in columns.items()})
            held += take
            used += take
            if held == batch_size:
                batch = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
                pending, held = [], 0
                batches += 1
                yield batch, (StreamPosition(w + 1, 0, batches) if used == n else StreamPosition(w, used, batches))


def _file_keys(path: str) -> list[str]:
    """The forms a reader may report ``path`` in: as given, and for object stores without its ``scheme://``
    (Ray's readers drop it: ``s3://b/x.tar`` -> ``b/x.tar``), for local files absolute."""
    import os

    if "://" in path and not path.startswith("file://"):
        return [path, os.path.normpath(path.split("://", 1)[1])]
    local = path.removeprefix("file://")
    return [path, os.path.normpath(local), os.path.abspath(local)]


class FileIndex:
    """Each file's index in the rank's file list of the epoch, looked up by the path a reader reports for it."""

    def __init__(self, files: list[str], first: int = 0) -> None:
        self._index = {key: first + i for i, f in enumerate(files) for key in _file_keys(f)}

    def __call__(self, path: str) -> int:
        from pipeline.errors import DataError

        text = str(path)
        for key in (text, *_file_keys(text)[1:]):
            if key in self._index:
                return self._index[key]
        raise DataError(f"a reader reported a sample from {path}, which is not one of this epoch's files")

    def column(self, paths: list[str], counts: list[int]) -> np.ndarray:
        """The :data:`FILE_COLUMN` of ``counts[i]`` samples from each ``paths[i]``."""
        if not paths:
            return np.zeros(0, np.int64)
        return np.concatenate([np.full(c, self(p), np.int64) for p, c in zip(paths, counts)])
