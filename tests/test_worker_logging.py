"""What training workers print reaches the driver once: Ray Train V2's print patch doubles prints (see
``trainer.worker_env``), and Ray Data's per-batch warning reset repeated two DeepSpeed deprecations at every step."""
from __future__ import annotations

import os
import re


def test_ray_workers_run_without_ray_trains_print_patch(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def env_of_a_worker() -> str | None:
        return os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH")

    assert ray.get(env_of_a_worker.remote()) == "0"


def test_a_users_setting_wins(monkeypatch):
    from pipeline.train.trainer import worker_env

    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")
    assert worker_env() == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "1"}


def _zero_collective_deprecations(calls: int) -> int:
    """How often torch's deprecations of the two ZeRO collectives are shown over ``calls`` calls of each, with Ray
    Data's per-batch tensor conversion (which enters ``warnings.catch_warnings``) between calls, as in a worker."""
    import contextlib
    import warnings

    import numpy as np
    import torch
    import torch.distributed as dist
    from ray.data.util.torch_utils import convert_ndarray_to_torch_tensor

    with warnings.catch_warnings(record=True) as seen:
        for _ in range(calls):
            for collective in (dist.all_gather_into_tensor, dist.reduce_scatter_tensor):
                with contextlib.suppress(Exception):  # no process group here: the warning comes before the failure
                    collective(torch.zeros(2), torch.zeros(1))
            convert_ndarray_to_torch_tensor(np.zeros(3, dtype=np.float32))
    return sum("is deprecated" in str(w.message) and "torch.distributed" in str(w.message) for w in seen)


def test_deepspeeds_torch_deprecations_are_not_printed_at_every_step():
    import warnings

    import pytest

    from pipeline.train.engine import quiet_deepspeed_deprecations

    with warnings.catch_warnings():  # the filter must not outlive this test
        shown = _zero_collective_deprecations(3)
        if shown == 0:
            pytest.skip("this torch no longer deprecates all_gather_into_tensor / reduce_scatter_tensor")
        assert shown == 6  # Ray Data's conversion resets the registry: both shown again at every step
        quiet_deepspeed_deprecations()
        assert _zero_collective_deprecations(3) == 0


def test_ray_data_execution_logs_and_report_lines_are_quiet_but_warnings_show():
    """Ray Data's per-dataset INFO lines are marked ``hide`` (the flag Ray Data's console handler drops; its log
    file keeps them), urllib3's per-attempt retry lines and Ray Train's ``Reporting training result`` lines are
    dropped; warnings are not. Checked with a handler of our own on each logger that skips ``hide`` records as Ray
    Data's console handler does, so the test does not depend on which stream an earlier test left that handler on."""
    import logging

    import ray.data  # noqa: F401 - configures Ray Data's logging
    from ray.train.v2._internal.execution import context as train_context

    from pipeline.console import quiet_ray_logs, restore_ray_logs

    loggers = {"executor": logging.getLogger("ray.data._internal.execution.streaming_executor"),
               "reporter": logging.getLogger(train_context.__file__),
               "urllib3": logging.getLogger("urllib3.connectionpool")}
    seen: dict[str, list[str]] = {name: [] for name in loggers}

    class Keep(logging.Handler):
        def __init__(self, name: str) -> None:
            super().__init__(level=logging.INFO)
            self.name_ = name

        def emit(self, record: logging.LogRecord) -> None:
            if not getattr(record, "hide", False):
                seen[self.name_].append(record.getMessage())

    handlers = {name: Keep(name) for name in loggers}
    levels = {name: logger.level for name, logger in loggers.items()}
    for name, logger in loggers.items():
        logger.addHandler(handlers[name])
        logger.setLevel(logging.INFO)
    restore_ray_logs()  # an earlier test's driver (fit) may have quieted this process already
    try:
        loggers["executor"].info("Execution plan of Dataset before_0: InputDataBuffer")
        assert seen["executor"] == ["Execution plan of Dataset before_0: InputDataBuffer"]  # shown before
        quiet_ray_logs()
        quiet_ray_logs()  # idempotent
        loggers["executor"].info("Execution plan of Dataset quiet_1: InputDataBuffer")
        loggers["executor"].info("Starting execution of Dataset quiet_1.")
        loggers["executor"].warning("Dataset quiet_1 is slow: a warning that matters")
        loggers["reporter"].info("Reporting training result 1: TrainingReport(...) from rank 0")
        loggers["urllib3"].warning("Retrying (Retry(total=6)) after connection broken")
        loggers["reporter"].warning("a Ray Train warning")
    finally:
        for name, logger in loggers.items():
            logger.removeHandler(handlers[name])
            logger.setLevel(levels[name])
        restore_ray_logs()  # process-wide logging state must not leak into other tests
    assert seen["executor"] == ["Execution plan of Dataset before_0: InputDataBuffer",
                                "Dataset quiet_1 is slow: a warning that matters"]
    assert seen["urllib3"] == []
    assert seen["reporter"] == ["a Ray Train warning"]


def test_step_bar_shows_step_loss_throughput_data_wait_and_eta():
    import io
    import time

    from pipeline.console import StepBar

    out = io.StringIO()
    bar = StepBar(40, "digits", file=out)
    for step in (20, 25, 30):  # a resumed run: its first report is past its checkpoint's step
        bar.update({"step": step, "loss": 0.12345, "samples_per_s": 640.2, "data_wait_fraction": 0.031})
        time.sleep(0.6)
    bar.bar.refresh()
    last = out.getvalue().split("\r")[-1]
    assert "step 30/40" in last and "loss=0.1235" in last and "samples/s=640" in last and "data wait=3%" in last
    assert re.search(r"\[\d\d:\d\d<00:\d\d, ", last), last  # an ETA from the rate since the first report
    bar.close()


def test_verbose_flag_reaches_workers(monkeypatch):
    from pipeline.console import VERBOSE_ENV, is_verbose
    from pipeline.config import TrainJobConfig
    from pipeline.train.trainer import worker_env

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert not is_verbose(TrainJobConfig()) and VERBOSE_ENV not in worker_env()
    assert is_verbose(TrainJobConfig.model_validate({"log": {"verbose": True}}))
    monkeypatch.setenv(VERBOSE_ENV, "1")
    assert is_verbose(TrainJobConfig()) and worker_env()[VERBOSE_ENV] == "1"
