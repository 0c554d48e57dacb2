"""Reading flowrail checkpoints: metadata, completeness and the newest registered checkpoint of a run.

Only files are read (no DeepSpeed, no model): this module sits below everything that loads checkpoints
(:mod:`pipeline.train.checkpoint`, :mod:`pipeline.train.init_from`, :mod:`pipeline.flux.export`), so none of them
imports another in a circle. The layout is described in :mod:`pipeline.train.checkpoint`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import CheckpointError, DataError

META = "flowrail.json"
EMA_FILE = "ema.safetensors"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the registered checkpoints


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a flowrail checkpoint: {META} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META} is not valid JSON ({exc.msg})") from None
    if not isinstance(meta, dict) or "step" not in meta or "config" not in meta:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META} is not flowrail checkpoint metadata")
    return meta


def _step_of(path: Path) -> int:
    try:
        return int(read_meta(path)["step"])
    except (CheckpointError, KeyError, ValueError, json.JSONDecodeError):
        return -1


def is_complete(ckpt: Path) -> bool:
    """Rank 0's metadata and EMA weights and every rank's RNG file are present."""
    try:
        meta = read_meta(ckpt)
    except CheckpointError:
        return False
    world = int(meta.get("world_size", 1))
    return (ckpt / EMA_FILE).is_file() and all((ckpt / "rng" / f"rank{r}.pt").is_file() for r in range(world))


def registered_checkpoints(run_dir: Path) -> set[str] | None:
    """Names of the checkpoint directories Ray Train registered in ``run_dir`` (None without a snapshot)."""
    snapshot = run_dir / RAY_SNAPSHOT
    if not snapshot.is_file():
        return None
    try:
        state = json.loads(snapshot.read_text())
    except json.JSONDecodeError:
        return None
    names = {r["checkpoint_dir_name"] for r in state.get("checkpoint_results", []) if "checkpoint_dir_name" in r}
    latest = state.get("latest_checkpoint_result") or {}
    if "checkpoint_dir_name" in latest:
        names.add(latest["checkpoint_dir_name"])
    return names


def find_latest(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest complete (and, under Ray, registered) checkpoint under a dir."""
    from pipeline.data.fence import check_path

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    check_path(path, "read checkpoint")  # init_from, evaluate, register, audit: never a path into a fence
    if (path / META).is_file():
        if not (path / EMA_FILE).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {EMA_FILE} is missing")
        return path
    complete = []
    for meta in path.rglob(META):
        ckpt = meta.parent
        registered = registered_checkpoints(ckpt.parent)
        if registered is not None and ckpt.name not in registered:
            continue  # written but never registered by Ray Train (a rank failed while reporting it)
        if is_complete(ckpt):
            complete.append(ckpt)
    if not complete:
        raise CheckpointError(f"no complete flowrail checkpoint found under {path}")
    return max(complete, key=lambda p: (_step_of(p), p.stat().st_mtime))


def resume_world_size(run_storage: str) -> tuple[str, int] | None:
    """``(checkpoint location, world size)`` of the checkpoint a re-run of this run would resume from (Ray Train
    V2 restores the latest registered checkpoint of ``storage_path/name``), or None for a new run.

    Works for local and object-store run storage (only two small files are read), so the driver can refuse a
    resume under another ``train.num_workers`` before any worker starts.
    """
    from pipeline.data import storage

    snapshot = storage.join(run_storage, RAY_SNAPSHOT)
    if not storage.exists(snapshot):
        return None
    try:
        latest = json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result") or {}
    except json.JSONDecodeError:
        return None
    name = latest.get("checkpoint_dir_name")
    if not name:
        return None
    ckpt = storage.join(run_storage, name)
    try:
        meta = json.loads(storage.read_bytes(storage.join(ckpt, META)))
    except (json.JSONDecodeError, DataError):  # registered but unreadable: the worker's restore names it
        return None
    return ckpt, int(meta.get("world_size", 1))


def world_size_error(ckpt: str | Path, saved: int, num_workers: int) -> CheckpointError:
    """The one line for resuming a checkpoint of ``saved`` workers with ``num_workers``."""
    return CheckpointError(f"checkpoint {ckpt} was written by {saved} workers but this run has "
                           f"train.num_workers={num_workers}: resume with train.num_workers={saved}, or start a "
                           f"new run_name with init_from={ckpt}")
