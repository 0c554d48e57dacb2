"""The resources each training worker's Ray Data stream may use.

Every training worker runs its own Ray Data executor (``pipeline.data.streaming.epoch_dataset``: a deterministic
stream per rank, which Ray Train's ``streaming_split`` cannot give). Left at its defaults, each of those executors
sizes itself to the whole cluster — ``world`` executors each believing they own every CPU and half the object
store. Ray Train's own dataset integration avoids this by excluding the training workers' resources; here the
driver does the equivalent explicitly and splits what is left between the ranks:

    cpu_r = (C - world * c_w - world * g_c) / world            (or ``data.read_cpus`` when set)
    osm_r = M * f / world

with ``C`` the cluster's CPUs, ``c_w`` = ``train.cpus_per_worker``, ``M`` the cluster's object store memory and
``f`` = 0.5 Ray Data's default share of it. Each executor gets ``ExecutionResources(cpu=cpu_r,
object_store_memory=osm_r)`` as ``DataContext.execution_options.resource_limits``, and its read tasks ask for
``min(1, cpu_r)`` CPUs each, so that at least one fits the budget. Ray Core's logical resources already keep a
read task off a CPU a training actor holds; the budget keeps the ranks' executors from queueing more read tasks
than the spare CPUs can run and from overfilling the object store together.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import ConfigError

OBJECT_STORE_FRACTION = 0.5  # Ray Data's default share of the object store for one executor (ray 2.60)


@dataclass(frozen=True)
class ReadBudget:
    """One rank's Ray Data limits: CPUs for its read tasks, object store bytes for its blocks in flight."""

    cpu: float
    object_store_memory: float

    @property
    def task_cpus(self) -> float:
        """CPUs each read task asks for: at most 1, and never more than the whole budget (or none could run)."""
        return min(1.0, self.cpu)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def read_budget(cluster: dict[str, float], *, num_workers: int, cpus_per_worker: float,
                read_cpus: float | None = None) -> ReadBudget:
    """Each rank's :class:`ReadBudget` from the cluster's resources (``ray.cluster_resources()``) and the config.

    ``read_cpus`` (``data.read_cpus``) overrides the share of spare CPUs; it must still fit beside the training
    workers. Refused in one line when the training workers leave no CPU for reading.
    """
    total_cpu = float(cluster.get("CPU", 0.0))
    spare = total_cpu - num_workers * cpus_per_worker
    if read_cpus is not None:
        if num_workers * read_cpus > spare + 1e-9:
            raise ConfigError(f"data.read_cpus={read_cpus} x {num_workers} workers does not fit beside the training "
                              f"workers (train.num_workers x train.cpus_per_worker = "
                              f"{num_workers * cpus_per_worker:g} of the cluster's {total_cpu:g} CPUs)")
        cpu = read_cpus
    else:
        if spare <= 0:
            raise ConfigError(f"train.num_workers x train.cpus_per_worker = {num_workers * cpus_per_worker:g} takes "
                              f"all {total_cpu:g} CPUs of the cluster: none is left for reading shards (lower "
                              f"train.cpus_per_worker or add CPUs)")
        cpu = spare / num_workers
    memory = float(cluster.get("object_store_memory", 0.0)) * OBJECT_STORE_FRACTION / num_workers
    return ReadBudget(cpu=cpu, object_store_memory=memory)


def apply_budget(budget: ReadBudget | None) -> None:
    """Set ``budget`` as the resource limits of the Ray Data executors this process starts from now on
    (``None``: Ray Data's own limits, the whole cluster)."""
    import ray.data
    from ray.data import ExecutionResources

    ctx = ray.data.DataContext.get_current()
    if budget is None:
        ctx.execution_options.resource_limits = ExecutionResources.for_limits()
    else:
        ctx.execution_options.resource_limits = ExecutionResources(
            cpu=budget.cpu, object_store_memory=budget.object_store_memory or None)


def budget_from(value: dict[str, Any] | None) -> ReadBudget | None:
    """The :class:`ReadBudget` a worker received from the driver (``None`` when none was sent)."""
    return ReadBudget(**value) if value else None
