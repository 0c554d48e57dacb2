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


def test_ray_data_execution_logs_and_report_lines_are_quiet_but_warnings_show(capfd):
    """Ray Data's per-dataset INFO lines leave its console handler (its log file keeps them); its warnings do not.
    Ray Train's ``Reporting training result`` lines are dropped."""
    import logging

    import ray.data  # noqa: F401 - configures Ray Data's logging (console handler with its `hide` filter)
    from ray.train.v2._internal.execution import context as train_context

    from pipeline.console import quiet_ray_logs, restore_ray_logs

    executor = logging.getLogger("ray.data._internal.execution.streaming_executor")
    reporter = logging.getLogger(train_context.__file__)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep(level=logging.INFO)
    reporter.addHandler(keep)
    reporter.setLevel(logging.INFO)
    restore_ray_logs()  # an earlier test's driver (fit) may have quieted this process already
    try:
        executor.info("Execution plan of Dataset before_0: InputDataBuffer")
        assert "Execution plan of Dataset before_0" in capfd.readouterr().err  # Ray Data's console shows it
        quiet_ray_logs()
        quiet_ray_logs()  # idempotent
        executor.info("Execution plan of Dataset quiet_1: InputDataBuffer")
        executor.info("Starting execution of Dataset quiet_1.")
        executor.warning("Dataset quiet_1 is slow: a warning that matters")
        reporter.info("Reporting training result 1: TrainingReport(...) from rank 0")
        logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=6)) after connection broken")
        reporter.warning("a Ray Train warning")
        err = capfd.readouterr().err
    finally:
        reporter.removeHandler(keep)
        restore_ray_logs()  # process-wide logging state must not leak into other tests
    assert "quiet_1: InputDataBuffer" not in err and "Starting execution" not in err and "Retrying (" not in err
    assert "a warning that matters" in err
    assert seen == ["a Ray Train warning"]


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
