"""Connecting to Ray: the one place that starts or joins a cluster (below both training and evaluation).

``init_ray`` joins ``$RAY_ADDRESS`` or starts a local Ray; ``worker_env`` is the environment its workers get.
"""
from __future__ import annotations

import os
from typing import Any


def worker_env() -> dict[str, str]:
    """Environment of this job's Ray workers (merged with a ``ray job submit`` runtime env).

    Ray Train V2 patches ``print`` in its workers to also send each line through the root logger; Ray already wraps
    the workers' stdout, so the patched print writes every line twice and the driver shows each progress line twice
    (Ray 2.60). Without the patch, worker prints still stream to the driver, once.
    """
    from pipeline.console import VERBOSE_ENV

    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")}
    if os.environ.get(VERBOSE_ENV):  # `flowrail --verbose`: the workers show Ray's per-dataset/per-report lines too
        env[VERBOSE_ENV] = os.environ[VERBOSE_ENV]
    return env


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` or start a local Ray (its dashboard on 127.0.0.1 only)."""
    import ray

    if ray.is_initialized():
        return
    # DeepSpeed's accelerator is chosen inside each worker from train.use_gpu (pipeline/train/engine.py),
    # not from the driver's hardware: a cluster head often has no GPU.
    kwargs: dict[str, Any] = {"log_to_driver": True, "runtime_env": {"env_vars": worker_env()}}
    # Ray's token authentication (on by default for new local clusters since Ray 2.59) is left as Ray sets it:
    # nothing here passes RAY_AUTH_MODE or an auth system config.
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        print("[flowrail] warning: RAY_AUTH_MODE=disabled: this Ray cluster accepts unauthenticated requests",
              flush=True)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        # The dashboard process serves Ray's state API. Ray Train V2's PlacementGroupCleaner asks it whether a
        # controller is alive and removes the workers' placement group when a controller is killed (a Tune trial
        # stopped by ASHA). Without it, every stopped trial leaks its workers' CPUs.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
