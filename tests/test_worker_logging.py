"""What training workers print reaches the driver once: Ray Train V2's print patch doubles prints (see
``trainer.worker_env``), and Ray Data's per-batch warning reset repeated two DeepSpeed deprecations at every step."""
from __future__ import annotations

import os


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
