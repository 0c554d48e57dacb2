"""Sample generation spread over Ray workers; each tallies features of its own samples, the driver reduces once.

Worker ``i`` gets a contiguous slice of the class-balanced label list ``arange(N) % num_classes`` and its own seed
(``SeedSequence(eval.seed).spawn``); within a worker, batch ``j`` is sampled with a seed derived from
``(worker seed, j)``. Images never leave the worker: it returns a :class:`WorkerResult` holding mergeable feature
statistics (:class:`~evals.digits_metrics.DigitsTally`, Inception :class:`~evals.frechet.RunningStats`), the NFE and a
few examples per class for the sample grid. With one worker the same function runs in-process, without Ray.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evals.digits_metrics import DigitsTally
from evals.frechet import RunningStats


@dataclass
class EvalPlan:
    """What every worker computes (everything here is small and picklable)."""

    want_digits: bool
    want_fid: bool
    inception_weights: str | None
    cache_dir: str | None
    batch_size: int
    examples_per_class: int


@dataclass
class WorkerResult:
    num_samples: int = 0
    nfe: int = 0
    seconds: float = 0.0
    digits: DigitsTally | None = None
    inception: RunningStats | None = None
    examples: dict[int, torch.Tensor] = field(default_factory=dict)  # class -> up to examples_per_class images

    def merge(self, other: "WorkerResult", examples_per_class: int) -> "WorkerResult":
        self.num_samples += other.num_samples
        self.nfe = max(self.nfe, other.nfe)
        self.seconds = max(self.seconds, other.seconds)  # wall time of the slowest worker
        if other.digits is not None:
            self.digits = other.digits if self.digits is None else self.digits.merge(other.digits)
        if other.inception is not None:
            self.inception = other.inception if self.inception is None else self.inception.merge(other.inception)
        for c, imgs in other.examples.items():
            have = self.examples.get(c)
            self.examples[c] = (imgs if have is None else torch.cat([have, imgs]))[:examples_per_class]
        return self


def plan_slices(num_samples: int, num_classes: int, num_workers: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """Class-balanced labels split into ``num_workers`` contiguous slices, each with an independent seed."""
    labels = torch.arange(num_samples) % max(num_classes, 1)
    workers = max(1, min(num_workers, num_samples))
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(workers)]
    return [(chunk, s) for chunk, s in zip(torch.tensor_split(labels, workers), seeds)]


def eval_slices(cfg: Any, num_classes: int) -> list[tuple[torch.Tensor, int]]:
    """:func:`plan_slices` of ``eval.num_samples`` samples over ``eval.num_workers`` workers from ``eval.seed``."""
    return plan_slices(cfg.eval.num_samples, num_classes, cfg.eval.num_workers, cfg.eval.seed)


def _batch_seed(worker_seed: int, index: int) -> int:
    return int(np.random.SeedSequence([worker_seed, index]).generate_state(1)[0])


def generate_and_tally(source: Any, labels: torch.Tensor, seed: int, plan: EvalPlan,
                       progress: Any = None) -> WorkerResult:
    """Sample ``labels`` from ``source`` (a :class:`Trained`, or ``(checkpoint_path, TrainJobConfig)``) and tally.

    Labels < 0 never occur here; ``classifier_accuracy`` compares predictions with these requested labels.
    ``progress``: the driver's bar feed (:func:`pipeline.console.send_progress`), told of every batch.
    """
    from pipeline.console import send_progress
    from pipeline.sampling import sample_classes

    start = time.time()
    trained = materialise(source)
    classifier = inception = None
    if plan.want_digits:
        from evals.digits_classifier import load_digits_classifier

        classifier = load_digits_classifier(plan.cache_dir)
    if plan.want_fid:
        from evals.inception import InceptionFeatures

        inception = InceptionFeatures(plan.inception_weights, device="cuda" if torch.cuda.is_available() else "cpu")
    result = WorkerResult(digits=DigitsTally() if classifier is not None else None,
                          inception=RunningStats(2048) if inception is not None else None)
    batches = labels.split(plan.batch_size)
    for j, chunk in enumerate(batches):
        send_progress(progress, 0, f"sampling batch {j + 1}/{len(batches)}")
        out = sample_classes(trained, chunk, _batch_seed(seed, j), batch_size=plan.batch_size)
        images = out.x.detach().float().cpu().clamp(-1, 1)
        result.nfe = int(out.nfe)
        result.num_samples += len(chunk)
        if result.digits is not None or result.inception is not None:
            send_progress(progress, 0, f"features of batch {j + 1}/{len(batches)}")
        if result.digits is not None:
            result.digits.add(classifier, images, chunk)
        if result.inception is not None:
            result.inception.update(inception(images))
        send_progress(progress, len(chunk), f"batch {j + 1}/{len(batches)} done")
        for c in chunk.unique().tolist():
            have = result.examples.get(c)
            if have is None or len(have) < plan.examples_per_class:
                new = images[chunk == c]
                result.examples[c] = (new if have is None else torch.cat([have, new]))[:plan.examples_per_class]
    result.seconds = time.time() - start
    return result


def materialise(source: Any) -> Any:
    """A :class:`Trained` from ``source`` (loaded when it is ``(path, cfg)``), its model on the GPU when there is one."""
    if isinstance(source, tuple):
        from pipeline.train.checkpoint import load_trained

        path, cfg = source
        trained = load_trained(path, overrides=cfg)
    else:
        trained = source
    if torch.cuda.is_available():
        trained.model.to("cuda")
    return trained


def _checkpoint_matches(trained: Any) -> bool:
    """True when ``trained.path`` is a checkpoint of exactly these weights (same step), so workers can load it."""
    from pipeline.errors import CheckpointError
    from pipeline.train.checkpoint import read_meta

    path = getattr(trained, "path", None)
    try:
        return path is not None and int(read_meta(Path(path))["step"]) == int(trained.step)
    except (CheckpointError, KeyError, ValueError, OSError):
        return False


def run_workers(trained: Any, cfg: Any, plan: EvalPlan, progress: Any = None) -> WorkerResult:
    """Generate ``cfg.eval.num_samples`` samples over ``cfg.eval.num_workers`` workers and reduce their tallies.

    Workers load the checkpoint from ``trained.path`` with ``cfg`` (so they sample with ``cfg.sampler`` and
    ``cfg.guidance``); a model whose weights are not that checkpoint's (no path, or another step) is shipped
    through the Ray object store instead. ``progress``: the driver's bar feed (a Ray queue when there are workers).
    """
    slices = eval_slices(cfg, trained.num_classes)
    if len(slices) == 1:
        labels, seed = slices[0]
        return generate_and_tally(trained, labels, seed, plan, progress)

    import ray

    from pipeline.cluster import init_ray

    init_ray()
    source: Any = (str(trained.path), cfg) if _checkpoint_matches(trained) else ray.put(trained)
    task = ray.remote(generate_and_tally).options(
        num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0, max_retries=1)
    refs = [task.remote(source, labels, seed, plan, progress) for labels, seed in slices]
    total = WorkerResult()
    for part in ray.get(refs):
        total.merge(part, plan.examples_per_class)
    return total
