"""Metric reports to Ray Train that do not stall the training loop.

Ray Train (2.6x) hands every ``ray.train.report`` to its controller through a one-slot queue per worker, which the
controller empties when it polls the workers (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default), and
each report first makes a round trip to the synchronization actor (the checkpoint directory name is agreed on by
all ranks, also when there is no checkpoint). A loop that reports more often than the controller polls therefore
waits up to a poll interval at each report: with a near-free model and a report every 20 steps that was 88 ms
per step on this machine (``benchmarks/train_overhead/host_overhead.py``).

:class:`MetricReporter` makes the metric-only reports on one background thread per rank. Ray Train's report is a
collective (every rank must make the same sequence of calls), so whether a window is reported is agreed by all
ranks: the caller sums :meth:`MetricReporter.idle` over the ranks in the window's existing all-reduce and reports
only when every rank's reporter is idle (otherwise that window reaches MLflow but not Ray Train; the next one
does). A checkpoint report is made on the loop's own thread after :meth:`drain`, so reports keep their order.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class MetricReporter:
    """One background thread that makes ``ray.train.report(metrics)`` calls, one at a time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flowrail-train-report")
        self._pending: Future | None = None

    def idle(self) -> bool:
        """No report in flight (a failed one re-raises its error here)."""
        if self._pending is None:
            return True
        if not self._pending.done():
            return False
        self._pending, done = None, self._pending
        done.result()
        return True

    def submit(self, metrics: dict[str, Any]) -> None:
        """Report ``metrics`` in the background; only call when every rank agreed that all reporters are idle."""
        import ray.train

        self.drain()
        self._pending = self._pool.submit(ray.train.report, dict(metrics))

    def drain(self) -> None:
        """Wait for the report in flight (before a checkpoint report, and at the end)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Stop the thread without waiting (on the way out after an error, the controller may be gone)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
