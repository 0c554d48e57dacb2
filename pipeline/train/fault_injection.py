"""Deliberate faults for reliability tests: :class:`LoopHooks` a test installs through ``$FLOWRAIL_FAULT_INJECT``
on the driver (the driver copies it into the loop's config; without it the loop runs the no-op hooks).

``kill@R:S``: rank R SIGKILLs its own process right after step S, once per run (a marker file in ``marker_dir``
stops the restarted worker from doing it again). Before killing it waits until Ray Train has registered the last
checkpoint (``checkpoint_manager_snapshot.json`` in ``run_storage``): the controller collects reports by polling,
and a checkpoint reported moments before a crash may never be registered (the restart then resumes from the one
before). ``killdriver@R:S``: the same, but rank R SIGKILLs the driver process (a re-run must pick the run up).
``nan@R:B``: rank R's loss is NaN on its B-th batch (counted as steps + skipped steps, so it fires once).
Comma-separated for several.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.train import checkpoint as ckpt_io
from pipeline.train.loop import LoopHooks

ENV = "FLOWRAIL_FAULT_INJECT"


def loop_config_entries(run_dir: str | Path, run_name: str, run_storage: str) -> dict[str, Any]:
    """What a driver adds to its loop config when ``$FLOWRAIL_FAULT_INJECT`` is set (nothing otherwise)."""
    if not os.environ.get(ENV):
        return {}
    return {"fault_injection": os.environ[ENV], "fault_marker_dir": str(Path(run_dir) / "faults" / run_name),
            "fault_run_storage": str(run_storage), "fault_driver_pid": os.getpid()}


def hooks_from(loop_config: dict[str, Any]) -> LoopHooks:
    """The loop's hooks: fault injection if the driver asked for it, else the production no-ops."""
    if not loop_config.get("fault_injection"):
        return LoopHooks()
    return FaultInjection(loop_config["fault_injection"], loop_config.get("fault_marker_dir"),
                          loop_config.get("fault_run_storage"), loop_config.get("fault_driver_pid"))


class FaultInjection(LoopHooks):
    """The faults of one spec (module docstring)."""

    def __init__(self, spec: str | None, marker_dir: str | None, run_storage: str | None = None,
                 driver_pid: int | None = None) -> None:
        self.faults: list[tuple[str, int, int]] = []
        self.marker_dir = Path(marker_dir) if marker_dir else None
        self.run_storage = Path(run_storage) if run_storage else None
        self.driver_pid = driver_pid  # ``killdriver@R:S``: rank R SIGKILLs the driver instead of itself
        for part in filter(None, (spec or "").split(",")):
            kind, _, where = part.strip().partition("@")
            rank, _, index = where.partition(":")
            self.faults.append((kind, int(rank), int(index)))

    def on_loss(self, rank: int, batch_index: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if ("nan", rank, batch_index) in self.faults else loss

    def after_step(self, rank: int, step: int, last_checkpoint_step: int) -> None:
        if ("killdriver", rank, step) in self.faults and self.driver_pid and self.marker_dir is not None:
            self._kill("killdriver", rank, step, last_checkpoint_step, self.driver_pid)
        if ("kill", rank, step) in self.faults and self.marker_dir is not None:
            self._kill("kill", rank, step, last_checkpoint_step, os.getpid())

    def _registered_step(self) -> int:
        if self.run_storage is None:
            return -1
        names = ckpt_io.registered_checkpoints(self.run_storage) or set()
        steps = [ckpt_io.read_meta(self.run_storage / n)["step"] for n in names
                 if (self.run_storage / n / ckpt_io.META).is_file()]
        return max(steps, default=-1)

    def _kill(self, kind: str, rank: int, step: int, last_checkpoint_step: int, pid: int) -> None:
        assert self.marker_dir is not None
        marker = self.marker_dir / f".fault-{kind}-r{rank}-s{step}"
        if marker.exists():
            return
        deadline = time.monotonic() + 300
        while self._registered_step() < last_checkpoint_step and time.monotonic() < deadline:
            time.sleep(0.5)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(pid))
        who = "the driver" if kind == "killdriver" else f"rank {rank}"
        print(f"[flowrail] fault injection: SIGKILL {who} (pid {pid}) after step {step}", flush=True)
        os.kill(pid, signal.SIGKILL)
