"""Each training worker's Ray Data resource budget (pipeline.data.read_budget): set from the cluster and the config,
and a real per-worker stream keeps within it beside actors holding the training workers' CPUs."""
from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.data.read_budget import ReadBudget, read_budget

GIB = 1 << 30


def test_budget_splits_the_cpus_training_leaves_and_the_object_store_between_the_ranks():
    b = read_budget({"CPU": 16.0, "GPU": 4.0, "object_store_memory": 8 * GIB}, num_workers=4, cpus_per_worker=2)
    assert b == ReadBudget(cpu=2.0, object_store_memory=1 * GIB)  # (16 - 4*2) / 4 CPUs; 8 GiB * 0.5 / 4
    assert b.task_cpus == 1.0
    small = read_budget({"CPU": 2.0, "object_store_memory": GIB}, num_workers=2, cpus_per_worker=0.5)
    assert small.cpu == 0.5 and small.task_cpus == 0.5  # a read task must fit the budget, or none would run
    assert 2 * small.cpu + 2 * 0.5 <= 2.0  # the ranks' budgets and the training workers fit the cluster together
    assert read_budget({"CPU": 16.0}, num_workers=4, cpus_per_worker=2, read_cpus=1.5).cpu == 1.5  # data.read_cpus


@pytest.mark.parametrize(("cluster_cpus", "workers", "cpw", "read_cpus", "named"), [
    (2.0, 2, 1.0, None, "train.cpus_per_worker"),  # training takes every CPU
    (4.0, 2, 1.0, 1.5, "data.read_cpus=1.5"),  # 2 x 1.5 does not fit beside 2 x 1
])
def test_a_budget_that_cannot_fit_is_refused_in_one_line(cluster_cpus, workers, cpw, read_cpus, named):
    with pytest.raises(ConfigError) as err:
        read_budget({"CPU": cluster_cpus}, num_workers=workers, cpus_per_worker=cpw, read_cpus=read_cpus)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_read_cpus_is_a_positive_config_field():
    from pipeline.config import TrainJobConfig, load_config

    assert load_config(TrainJobConfig, "train", ["data.read_cpus=0.25"]).data.read_cpus == 0.25
    with pytest.raises(ConfigError, match="read_cpus"):
        load_config(TrainJobConfig, "train", ["data.read_cpus=0"])


def test_privacy_training_refuses_read_cpus_it_would_not_use():
    """The privacy stage reads its sets once, whole, through Ray Train's datasets: no stream to budget."""
    from pipeline.config import load_config
    from privacy.config import PrivacyTrainConfig

    with pytest.raises(ConfigError, match="data.read_cpus=0.5: privacy training reads its sets once") as err:
        load_config(PrivacyTrainConfig, None, ["data.read_cpus=0.5"])
    assert "\n" not in str(err.value)
    assert load_config(PrivacyTrainConfig, None, []).data.read_cpus is None


def test_worker_streams_keep_to_their_budget_beside_the_training_actors(ray_local, digits_shards, monkeypatch):
    """Two actors hold the CPUs of two training workers (0.5 each) on the 2-CPU local Ray; the budget computed from
    the cluster gives each rank's stream 0.5 CPU. Both ranks' real epoch streams run at once: every scheduling step
    of their executors sees that limit, their read tasks never use more, every sample arrives, and the actors keep
    their CPUs (they answer while the streams run)."""
    import threading

    import ray
    import ray.data

    from pipeline.data.streaming import describe, epoch_dataset

    @ray.remote(num_cpus=0.5)
    class TrainingWorker:
        def ping(self) -> int:
            return 1

    actors = [TrainingWorker.remote() for _ in range(2)]
    assert ray.get([a.ping.remote() for a in actors]) == [1, 1]
    budget = read_budget(ray.cluster_resources(), num_workers=2, cpus_per_worker=0.5)
    assert budget.cpu == pytest.approx(0.5)

    seen: list[tuple[float, float]] = []  # (limit cpu, usage cpu) at every scheduling step of every executor

    class Record(ray.data._internal.execution.execution_callback.ExecutionCallback):
        def on_execution_step(self, executor) -> None:
            rm = executor._resource_manager
            seen.append((rm.get_global_limits().cpu, rm.get_global_usage().cpu))

    classes = ray.data.DataContext.get_current().custom_execution_callback_classes
    monkeypatch.setattr(ray.data.DataContext.get_current(), "custom_execution_callback_classes", [*classes, Record])
    paths, info = describe(str(digits_shards / "train"), None)
    counts: dict[int, int] = {}
    errors: list[BaseException] = []

    def stream(rank: int) -> None:
        try:
            ds, _ = epoch_dataset(paths, info, policy="skip", seed=0, epoch=0, rank=rank, world=2, budget=budget)
            counts[rank] = sum(len(b["label"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test thread
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    assert ray.get([a.ping.remote() for a in actors], timeout=60) == [1, 1]
    for t in threads:
        t.join(timeout=300)
    from pipeline.data.read_budget import apply_budget

    apply_budget(None)
    if errors:
        raise errors[0]
    assert counts[0] + counts[1] == info.num_samples
    limits = {round(limit, 5) for limit, _ in seen}  # 0 while an executor has not yet sized itself (Ray's start-up)
    assert 0.5 in limits and max(limits) == 0.5  # never the whole cluster (2 CPUs), as without a budget
    assert max(usage for _, usage in seen) <= 0.5 + 1e-9 and max(usage for _, usage in seen) > 0
    for a in actors:
        ray.kill(a)
