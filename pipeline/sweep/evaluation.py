"""Scoring a checkpoint as its own Ray task, with its own resources (a GPU when the trial trains on GPUs).

Ray Train V2's controller actor (where Tune's report callback runs) has no CPU or GPU of its own: sampling a SiT-XL
or FLUX model there would hold the controller for minutes on whatever CPU its node has. The callback therefore only
submits :func:`score_checkpoint` and waits for the numbers; the sampling sweep uses the same task.
"""
from __future__ import annotations

from typing import Any


def score_checkpoint(checkpoint: Any, metrics: list[str], num_samples: int, seed: int | list[int],
                     sampler: dict[str, Any] | None = None, guidance: dict[str, Any] | None = None,
                     split: str | None = "select") -> dict[str, Any]:
    """Metrics (plus ``nfe``, ``step``, ``mlflow_run_id``) of a checkpoint (a ``ray.train.Checkpoint`` or a local
    path), sampled with its own sampler settings or with ``sampler``/``guidance`` replacing some of them.
    ``seed`` a list: each metric is a list of one value per seed. ``split``: the half of the validation set the
    score is taken against (``select`` for a sweep's selection, ``gate`` for the promotion gate)."""
    import torch

    from pipeline.sweep.metric import evaluate

    with _local_dir(checkpoint) as ckpt_dir:
        trained = _load(ckpt_dir, sampler, guidance)
        with torch.no_grad():
            if isinstance(seed, (list, tuple)):
                runs = [evaluate(trained, metrics, num_samples, int(s), split) for s in seed]
                out: dict[str, Any] = {k: [r[k] for r in runs] for k in runs[0]}
            else:
                out = dict(evaluate(trained, metrics, num_samples, seed, split))
    out.update(step=int(trained.step), mlflow_run_id=trained.run_id or "")
    return out


def _load(ckpt_dir: Any, sampler: dict[str, Any] | None, guidance: dict[str, Any] | None) -> Any:
    from evals.distributed import materialise
    from pipeline.sweep.metric import with_sampler
    from pipeline.train.checkpoint import load_trained

    trained = materialise(load_trained(ckpt_dir))
    if sampler or guidance:
        from pipeline.config import resolve_sampler

        trained = with_sampler(trained, *resolve_sampler(trained.config.sampler.model_dump(),
                                                         trained.config.guidance.model_dump(), sampler, guidance))
    return trained


def score_pair(candidate: Any, champion: Any | None, metric: str, num_samples: int, seeds: list[int],
               candidate_settings: tuple[dict | None, dict | None] = (None, None),
               champion_settings: tuple[dict | None, dict | None] = (None, None),
               split: str = "gate") -> dict[str, list[float] | None]:
    """The promotion gate's numbers: ``metric`` of the candidate and of the current champion (None: none), each
    sampled with its own sampler settings, on the same ``seeds``, ``num_samples`` and reference half, in this one
    task: ``{"candidate": [per seed], "champion": [per seed] | None}``."""
    out: dict[str, list[float] | None] = {"champion": None}
    for name, ckpt, (sampler, guidance) in (("candidate", candidate, candidate_settings),
                                            ("champion", champion, champion_settings)):
        if ckpt is not None:
            scored = score_checkpoint(ckpt, [metric], num_samples, list(seeds), sampler, guidance, split)
            out[name] = [float(v) for v in scored[metric]]
    return out


def score_pair_remotely(*args: Any, cpus: float, gpus: float, **kwargs: Any) -> dict[str, list[float] | None]:
    """:func:`score_pair` as one Ray task (``cpus``/``gpus``), outside any caller's placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pipeline.cluster import init_ray

    init_ray()
    task = ray.remote(score_pair).options(
        num_cpus=cpus, num_gpus=gpus, max_retries=0, name="flowrail-promotion-gate",
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return ray.get(task.remote(*args, **kwargs))


def _local_dir(checkpoint: Any):  # noqa: ANN202 - a context manager yielding a local directory
    from contextlib import nullcontext

    return checkpoint.as_directory() if hasattr(checkpoint, "as_directory") else nullcontext(str(checkpoint))


def score_remotely(checkpoint: Any, metrics: list[str], num_samples: int, seed: int, *, cpus: float, gpus: float,
                   sampler: dict[str, Any] | None = None, guidance: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`score_checkpoint` as a Ray task asking for ``cpus``/``gpus``; returns its result (errors re-raised)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pipeline.cluster import init_ray

    init_ray()
    # outside the caller's placement group: a Tune trial's group holds only the trial driver's own tiny bundle, and
    # tasks started inside a trial would otherwise be captured into it (and never fit)
    task = ray.remote(score_checkpoint).options(
        num_cpus=cpus, num_gpus=gpus, max_retries=0, name="flowrail-score-checkpoint",
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return ray.get(task.remote(checkpoint, list(metrics), num_samples, seed, sampler, guidance))
