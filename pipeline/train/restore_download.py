"""The checkpoint a resumed run restores, as a local directory on every rank: one download per node, not per rank.

A checkpoint on the run's local or shared filesystem is read where it is. One on an object store (``s3://``,
``gs://``) is downloaded by the node's local rank 0 into a directory named after the checkpoint and the node; the
ranks agree (one all-reduce) that the download worked before any reads it, and again after all have read it, before
local rank 0 deletes it.

Ray's ``Checkpoint.as_directory`` does the same through file locks on a shared temporary directory; in CI a rank
failed inside that locking while its node's other rank downloaded (a ``filelock`` timeout, then an error while
waiting), which restarted the whole worker group. Collectives the ranks already share make the order explicit.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import CheckpointError, first_line
from pipeline.train.collectives import all_reduce_sum


def node_download_dir(checkpoint_path: str, node_rank: int) -> Path:
    """``<tmp>/flowrail-restore-<hash of the checkpoint path>-node<N>`` (two Ray nodes may share one machine)."""
    digest = hashlib.sha256(checkpoint_path.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"flowrail-restore-{digest}-node{node_rank}"


@contextmanager
def restored_checkpoint_dir(checkpoint: Any, *, local_rank: int, node_rank: int) -> Iterator[Path]:
    """A local directory holding ``checkpoint`` (a ``ray.train.Checkpoint``) while the ranks restore from it.

    Every rank of the run must enter it (it holds two collectives when the checkpoint is remote)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    target = node_download_dir(str(checkpoint.path), node_rank)
    error = ""
    if local_rank == 0:
        try:
            shutil.rmtree(target, ignore_errors=True)  # a previous attempt's partial download
            checkpoint.to_directory(str(target))
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
            error = f"{type(exc).__name__}: {first_line(exc)}"
            shutil.rmtree(target, ignore_errors=True)
    if all_reduce_sum([float(bool(error))])[0] > 0:
        raise CheckpointError(f"could not download checkpoint {checkpoint.path} to resume from: "
                              f"{error or 'the download of another rank failed (its log says why)'}")
    try:
        yield target
    finally:
        all_reduce_sum([0.0])  # every rank of the node has read it
        if local_rank == 0:
            shutil.rmtree(target, ignore_errors=True)
