"""The Ray Data executor throttle (pipeline.data.executor_idle) and the worker's CPU thread count."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from pipeline.data import executor_idle
from pipeline.data.executor_idle import IdleExecutorThrottle, progress_signature


class _Op:
    def __init__(self, metrics: SimpleNamespace) -> None:
        self.metrics = metrics


def _executor(counter: int, queued: int) -> SimpleNamespace:
    """An object shaped like the executor for the throttle: one operator's counters and its output queue."""
    metrics = SimpleNamespace(num_inputs_received=counter, num_tasks_submitted=1, num_task_outputs_generated=1,
                              num_outputs_taken=0)
    op = _Op(metrics)
    return SimpleNamespace(_topology={op: SimpleNamespace(output_queue=SimpleNamespace(num_blocks=queued))})


def test_throttle_backs_off_while_nothing_moves_and_resets_on_progress(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(executor_idle.time, "sleep", slept.append)
    throttle = IdleExecutorThrottle()
    throttle.on_execution_step(_executor(0, 3))  # first step: nothing to compare with
    assert slept == []
    for _ in range(10):
        throttle.on_execution_step(_executor(0, 3))
    assert slept[:4] == [0.001, 0.002, 0.004, 0.008] and max(slept) == executor_idle.IDLE_SLEEP_MAX_S
    slept.clear()
    throttle.on_execution_step(_executor(0, 2))  # the consumer took a block: the next step follows at once
    throttle.on_execution_step(_executor(1, 2))  # an input went in
    assert slept == []
    throttle.on_execution_step(_executor(1, 2))
    assert slept == [executor_idle.IDLE_SLEEP_MIN_S]  # back-off starts over


def test_throttle_switches_itself_off_when_ray_internals_change(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(executor_idle.time, "sleep", slept.append)
    throttle = IdleExecutorThrottle()
    for _ in range(3):
        throttle.on_execution_step(SimpleNamespace(_topology={object(): None}))
    assert slept == [] and not throttle._enabled


def test_throttled_stream_reads_ray_executor_and_delivers_every_sample(ray_local, digits_shards, monkeypatch):
    """Through a real Ray Data stream (epoch_dataset, which installs the throttle) with a consumer slower than the
    reader: the throttle reads this Ray's executor (it would switch itself off otherwise), sees it move, and the
    stream still delivers every sample, in the same order as without it."""
    import ray.data

    from pipeline.data.streaming import describe, epoch_dataset

    paths, info = describe(str(digits_shards / "train"), None)
    classes = ray.data.DataContext.get_current().custom_execution_callback_classes
    seen: list[tuple[int, ...]] = []
    throttles: list[IdleExecutorThrottle] = []
    step = IdleExecutorThrottle.on_execution_step

    def recording_step(self, executor) -> None:  # the executor thread runs in this process: record, then throttle
        seen.append(progress_signature(executor))
        throttles.append(self)
        step(self, executor)

    def labels(slow: bool) -> list[int]:
        ds, _ = epoch_dataset(paths, info, policy="skip", seed=0, epoch=0, rank=0, world=1)
        out = []
        for batch in ds.iter_torch_batches(batch_size=64):
            out += batch["label"].tolist()
            if slow:
                time.sleep(0.05)
        return out

    monkeypatch.setattr(IdleExecutorThrottle, "on_execution_step", recording_step)
    throttled = labels(slow=True)
    monkeypatch.undo()
    assert IdleExecutorThrottle in classes  # epoch_dataset installed it for the whole process
    assert throttles and all(t._enabled for t in throttles)
    assert len(set(seen)) >= 3  # counters moved: the signature reads real operator state
    classes.remove(IdleExecutorThrottle)
    monkeypatch.setattr(executor_idle, "install_idle_throttle", lambda: None)
    try:
        plain = labels(slow=False)
    finally:
        monkeypatch.undo()
        executor_idle.install_idle_throttle()
    assert len(throttled) == info.num_samples and throttled == plain


@pytest.mark.parametrize(("cpus", "env", "expected"), [(0.5, None, 1), (3.0, None, 3), (4.0, "2", 2)])
def test_worker_threads_follow_its_cpu_reservation(monkeypatch, cpus, env, expected):
    from pipeline.train.worker_setup import set_cpu_threads

    before = torch.get_num_threads()
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    try:
        assert set_cpu_threads(cpus) == expected and torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
