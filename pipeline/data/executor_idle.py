"""Keep Ray Data's streaming executor from spinning while a training step runs.

Ray Data's scheduling loop blocks in ``ray.wait`` only while it has tasks in flight. When its read-ahead is
backpressured (the stream is a few blocks ahead of a slower consumer) and nothing is in flight, each loop step
returns at once and the loop polls flat out: measured in a Ray Train worker, that thread used about a third of a
core for a whole epoch, CPU the training step could not have (ray 2.60). :class:`IdleExecutorThrottle` sleeps a
few milliseconds after a step that changed nothing.
"""
from __future__ import annotations

import time
from typing import Any

try:  # a Ray Data internal: should it move, streams run unthrottled rather than fail
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:  # pragma: no cover - depends on the installed Ray
    ExecutionCallback = None  # type: ignore[assignment,misc]

IDLE_SLEEP_MIN_S = 0.001
# the most reaction time added, once a stream has been idle for a while (Ray Data's own ray.wait timeout is 0.1 s)
IDLE_SLEEP_MAX_S = 0.1


def progress_signature(executor: Any) -> tuple[int, ...]:
    """Counters that change whenever the executor or its consumer moves: inputs taken, tasks submitted, outputs
    generated and taken by each operator, and the blocks queued behind it (the consumer pops the last queue)."""
    sig: list[int] = []
    for op, state in executor._topology.items():
        m = op.metrics
        sig += [m.num_inputs_received, m.num_tasks_submitted, m.num_task_outputs_generated, m.num_outputs_taken,
                state.output_queue.num_blocks]
    return tuple(sig)


class IdleExecutorThrottle(ExecutionCallback or object):  # type: ignore[misc]
    """After a scheduling step that changed nothing (see :func:`progress_signature`), sleep; the sleep doubles
    from ``IDLE_SLEEP_MIN_S`` up to ``IDLE_SLEEP_MAX_S`` while nothing changes and resets when anything does.

    A step that moved anything is followed at once by the next, so a busy stream is not slowed; a stream that
    has waited long for its consumer reacts within ``IDLE_SLEEP_MAX_S``. Should Ray's internals change shape,
    the throttle switches itself off (it never fails a read).
    """

    def __init__(self) -> None:
        self._last: tuple[int, ...] | None = None
        self._sleep = 0.0
        self._enabled = True

    def on_execution_step(self, executor: Any) -> None:
        if not self._enabled:
            return
        try:
            sig = progress_signature(executor)
        except AttributeError:
            self._enabled = False
            return
        if sig == self._last:
            self._sleep = min(max(2 * self._sleep, IDLE_SLEEP_MIN_S), IDLE_SLEEP_MAX_S)
            time.sleep(self._sleep)
        else:
            self._sleep = 0.0
        self._last = sig


def install_idle_throttle() -> None:
    """Register :class:`IdleExecutorThrottle` for every dataset this process executes from now on (idempotent)."""
    import ray.data

    classes = getattr(ray.data.DataContext.get_current(), "custom_execution_callback_classes", None)
    if ExecutionCallback is not None and classes is not None and IdleExecutorThrottle not in classes:
        classes.append(IdleExecutorThrottle)
