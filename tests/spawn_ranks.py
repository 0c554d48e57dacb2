"""Run a function on N gloo ranks in fresh processes, from inside the pytest process, safely.

The pytest process holds a Ray driver, MLflow threads and a world-1 process group by the time these tests run.
Forking it (``multiprocessing.Manager()`` forks on Linux) can deadlock the child on a lock another thread held,
and then the test hangs the whole suite. Here every rank is a *spawned* interpreter, results come back as files,
the process-group variables the session's ``ds_process_group`` fixture exported are dropped in the child, and a
rank that hangs or dies fails the test in one line instead of taking the session with it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

_INHERITED_GROUP_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _rank_entry(rank: int, fn: Callable[..., Any], out_dir: str, args: tuple) -> None:
    for var in _INHERITED_GROUP_VARS:
        os.environ.pop(var, None)
    result = fn(rank, *args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_ranks(fn: Callable[..., Any], args: tuple, *, nprocs: int, out_dir: Path,
              timeout_s: float = 300.0) -> dict[int, Any]:
    """``fn(rank, *args)`` on ``nprocs`` spawned processes; returns ``{rank: fn's return value}``.

    ``fn`` must be importable by name (a module-level function) and return something ``torch.save`` can write.
    """
    import torch.multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(_rank_entry, args=(fn, str(out_dir), args), nprocs=nprocs, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException on a failed rank
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{fn.__name__}: {nprocs} ranks still running after {timeout_s:.0f} s; killed")
    return {rank: torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(nprocs)}
