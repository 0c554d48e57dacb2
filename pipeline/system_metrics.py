"""Per-node system metrics of a training run in MLflow: ``system/node_<N>/cpu_utilization_percentage``,
``system/node_<N>/system_memory_usage_megabytes``, disk and network, and ``gpu_<i>_utilization_percentage`` /
``gpu_<i>_memory_usage_megabytes`` where nvidia-ml-py (NVIDIA) or pyrocml (AMD) is installed.

MLflow's own ``SystemMetricsMonitor`` samples them on a thread; one runs in the first worker of every node
(``train.log.system_metrics``, on by default). It needs psutil; without it training goes on without them. It stops
by itself when the run is no longer RUNNING or the server cannot be reached (MLflow's own behaviour).
"""
from __future__ import annotations

import importlib.util
from typing import Any


def available() -> bool:
    """psutil is what MLflow's CPU/memory monitor needs; GPU monitors are added by MLflow when their package is."""
    return importlib.util.find_spec("psutil") is not None


def start_system_metrics(uri: str, run_id: str, node_rank: int, interval_s: float) -> Any | None:
    """Start sampling this node every ``interval_s`` seconds into ``run_id``; the monitor (``.finish()``) or None.

    ``resume_logging``: a resumed run continues the system metrics' step count instead of starting at 0 again."""
    if not available():
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                       resume_logging=True, node_id=f"node_{node_rank}", tracking_uri=uri)
        monitor.start()
    except Exception as exc:  # noqa: BLE001 - system metrics must never stop a training run
        print(f"[flowrail] system metrics not logged: {type(exc).__name__}: {exc}", flush=True)
        return None
    return monitor
