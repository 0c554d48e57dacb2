"""The training worker's torch thread count follows the CPUs Ray reserved for it (pipeline.train.worker_setup)."""
from __future__ import annotations

import pytest
import torch


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
