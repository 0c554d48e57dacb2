"""Worker prints reach the driver once (Ray Train V2's print patch doubles them: see ``trainer.worker_env``)."""
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
