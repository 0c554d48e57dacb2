"""Evaluate a trained model with any sampler configuration: sample, compute metrics, log to MLflow.

Metrics (``eval.metrics``):

- ``fd_digits``, ``precision``, ``recall``, ``classifier_accuracy``: in the digits classifier's feature space
  (:mod:`evals.digits_metrics`); they apply to 1-channel pixel data (``classifier_accuracy``: 10 classes).
- ``fid``: standard FID (Inception-v3 pool3, 2015-12-05 weights, :mod:`evals.inception`) against
  ``eval.reference_stats`` or statistics of the training shards computed once and cached.
- ``bpd``, ``reconstruction_mse``: NLL in bits/dim and data -> noise -> data error through the probability-flow
  ODE on real data (:mod:`evals.likelihood`; SiT family).

A FLUX fine-tune samples its shard set's first captions as the "classes" (:mod:`pipeline.flux.evaluation`:
Euler on the FLUX shifted schedule with ``flux.guidance``, decoded by the autoencoder).

``evaluate_checkpoint(trained, cfg)`` is what training (every K steps) and sweeps call; ``flowrail evaluate``
adds the MLflow run with the sampler settings as params and a sample grid.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evals.digits_metrics import DIGITS_METRICS
from evals.distributed import EvalPlan, WorkerResult, eval_slices, run_workers
from evals.likelihood import LIKELIHOOD_METRICS, check_applicable, likelihood_metrics

KNOWN_METRICS = (*DIGITS_METRICS, "fid", *LIKELIHOOD_METRICS)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    examples: dict[int, torch.Tensor] = field(default_factory=dict)  # class -> sample images for the grid
    skipped: list[str] = field(default_factory=list)  # requested metrics that do not apply to this model's data


def _digits_applicable(trained: Any) -> tuple[bool, bool]:
    """(features apply, classifier accuracy applies) for this model's data."""
    grey = getattr(trained.data, "kind", "pixels") == "pixels" and trained.image_shape[0] == 1
    return grey, grey and trained.num_classes == 10


def with_sampling_config(trained: Any, cfg: Any) -> Any:
    """``trained`` sampling with ``cfg.sampler`` / ``cfg.guidance`` (same weights; objective rebuilt if they differ)."""
    if cfg.sampler == trained.config.sampler and cfg.guidance == trained.config.guidance:
        return dataclasses.replace(trained, config=cfg)
    from pipeline.objective import build_objective

    return dataclasses.replace(trained, config=cfg, objective=build_objective(cfg, trained.num_classes))


def _fid_reference(trained: Any, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    from evals.frechet import load_stats

    if cfg.eval.reference_stats:
        return load_stats(cfg.eval.reference_stats)
    if getattr(trained.data, "kind", "pixels") not in ("pixels", "latents"):
        raise ValueError("eval.metrics=fid on this data needs eval.reference_stats (an npz with mu and sigma "
                         "of the real images' Inception features)")
    from evals.inception import FEATURE_DIM, InceptionFeatures
    from evals.reference import reference_stats

    inception = InceptionFeatures(cfg.eval.inception_weights, device="cuda" if torch.cuda.is_available() else "cpu")
    return reference_stats(cfg.data.shards, inception, feature_name="inception", dim=FEATURE_DIM,
                           image_size=trained.data.size, cache_dir=cfg.eval.cache_dir, batch_size=cfg.eval.batch_size)


def eval_plan(cfg: Any, want_digits: bool, want_fid: bool, inception_weights: str | None) -> EvalPlan:
    """What every evaluation worker computes: its batch (``eval.batch_size``), the digits classifier's cache
    (``eval.cache_dir``) and the examples kept per class (``samples.per_class``)."""
    return EvalPlan(want_digits=want_digits, want_fid=want_fid, inception_weights=inception_weights,
                    cache_dir=cfg.eval.cache_dir, batch_size=cfg.eval.batch_size,
                    examples_per_class=cfg.samples.per_class)


def run_evaluation(trained: Any, cfg: Any, show_progress: bool = False,
                   reference_split: str | None = None) -> EvalResult:
    """Sample ``cfg.eval.num_samples`` class-balanced samples with ``cfg``'s sampler and compute ``cfg.eval.metrics``.

    Returns the metrics plus ``nfe`` (model evaluations per sample), ``eval_samples`` and ``eval_seconds``.
    ``show_progress``: one bar on stderr over the samples, saying what is being done (``flowrail evaluate``).
    ``reference_split``: the digits metrics against the even (``select``) or odd (``gate``) half of their reference
    set only, so a sweep's selection and the promotion gate never score against the same real images.
    """
    from pipeline.console import TaskProgress

    remote = len(eval_slices(cfg, trained.num_classes)) > 1
    with TaskProgress(cfg.eval.num_samples, "evaluate", "samples", remote, enabled=show_progress) as progress:
        return _evaluate(trained, cfg, progress, reference_split)


def chosen_metrics(trained: Any, cfg: Any) -> tuple[list[str], list[str]]:
    """``(requested, skipped)`` of ``eval.metrics`` for this model's data: unknown names and likelihood metrics the
    model cannot give are refused in one line; digits metrics on other data are skipped with a line on stderr."""
    requested = list(dict.fromkeys(cfg.eval.metrics))
    unknown = [m for m in requested if m not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"eval.metrics: unknown metric '{unknown[0]}' (allowed: {', '.join(KNOWN_METRICS)})")
    digits_ok, accuracy_ok = _digits_applicable(trained)
    skipped = [m for m in requested if (m in DIGITS_METRICS and not digits_ok)
               or (m == "classifier_accuracy" and not accuracy_ok)]
    for m in skipped:
        print(f"[flowrail] evaluate: skipping {m}: it needs 1-channel digits-like pixel data"
              f"{' with 10 classes' if m == 'classifier_accuracy' else ''}", file=sys.stderr, flush=True)
    check_applicable(trained, requested)  # before any sampling
    return requested, skipped


def _evaluate(trained: Any, cfg: Any, progress: Any, reference_split: str | None = None) -> EvalResult:
    requested, skipped = chosen_metrics(trained, cfg)
    want_digits = any(m in DIGITS_METRICS and m not in skipped for m in requested)
    want_fid = "fid" in requested
    fid_reference = None
    if want_fid:
        from evals.inception import find_inception_weights

        weights = str(find_inception_weights(cfg.eval.inception_weights))  # fail before any sampling
        progress.doing("FID reference statistics")
        fid_reference = _fid_reference(trained, cfg)
    else:
        weights = None
    if want_digits:
        from evals.digits_classifier import load_digits_classifier

        progress.doing("digits classifier")
        load_digits_classifier(cfg.eval.cache_dir)  # train and cache once, before workers race to do it
    plan = eval_plan(cfg, want_digits, want_fid, weights)
    start = time.time()
    trained = with_sampling_config(trained, cfg)
    if cfg.model.name.lower() == "flux":  # captions as classes; Euler on the shifted schedule; autoencoder decode
        from pipeline.flux.evaluation import flux_eval_view

        trained = flux_eval_view(trained, cfg)
    progress.doing("sampling")
    if progress.remote and progress.enabled:
        from pipeline.cluster import init_ray

        init_ray()  # the bar's queue actor lives in Ray (the workers would start it anyway)
        progress.start_remote()
    total: WorkerResult = run_workers(trained, cfg, plan, progress.feed)
    progress.doing("metrics")
    metrics: dict[str, float] = {}
    if want_digits and total.digits is not None:
        from evals.digits_classifier import load_digits_classifier
        from evals.digits_metrics import digits_metrics, digits_reference

        reference = digits_reference(load_digits_classifier(cfg.eval.cache_dir), trained.data.size,
                                     half=reference_split)
        computed = digits_metrics(total.digits, reference)
        metrics.update({m: computed[m] for m in requested if m in computed and m not in skipped})
    if want_fid and total.inception is not None and fid_reference is not None:
        from evals.inception import fid_from_stats

        metrics["fid"] = fid_from_stats(total.inception, fid_reference)
    if any(m in LIKELIHOOD_METRICS for m in requested):
        progress.doing("likelihood (probability-flow ODE on real data)")
    metrics.update(likelihood_metrics(trained, cfg, requested))
    metrics.update(nfe=float(total.nfe), eval_samples=float(total.num_samples), eval_seconds=time.time() - start)
    return EvalResult(metrics=metrics, examples=total.examples, skipped=skipped)


def evaluate_checkpoint(trained: Any, cfg: Any, reference_split: str | None = None) -> dict[str, float]:
    """Metrics of ``trained`` (a :class:`pipeline.train.checkpoint.Trained`) sampled with ``cfg``'s settings.

    ``cfg`` is a ``TrainJobConfig``: ``eval.*`` says what to compute (metrics, num_samples, num_workers, seed,
    batch_size, cache_dir, inception_weights, reference_stats), ``sampler``/``guidance`` how to sample.
    """
    return run_evaluation(trained, cfg, reference_split=reference_split).metrics


def examples_grid(examples: dict[int, torch.Tensor], num_classes: int, path: Path) -> Path | None:
    """A labelled grid, one row per class, of the evaluation's own samples."""
    from pipeline.images import save_grid

    if not examples:
        return None
    classes = sorted(examples)
    per_row = max(len(examples[c]) for c in classes)
    rows = []
    for c in classes:
        imgs = examples[c]
        if len(imgs) < per_row:  # pad short rows with blank tiles
            imgs = torch.cat([imgs, -torch.ones(per_row - len(imgs), *imgs.shape[1:])])
        rows.append(imgs)
    names = [str(c) for c in classes] if num_classes else None
    return save_grid(torch.cat(rows), path, rows=len(classes), row_labels=names)


def metrics_table(metrics: dict[str, float]) -> str:
    """The metrics as a two-column table (name, value to 4 significant digits), one row each."""
    width = max([len("metric"), *map(len, metrics)])
    rows = [f"  {'metric':<{width}}  value", f"  {'-' * width}  {'-' * 10}"]
    rows += [f"  {name:<{width}}  {value:.4g}" for name, value in metrics.items()]
    return "\n".join(rows)


def sampling_params(cfg: Any, trained: Any) -> dict[str, str]:
    """MLflow params of an evaluation: sampler, guidance and eval settings, and which checkpoint was sampled."""
    from pipeline.config import flatten

    params = {f"sampler.{k}": v for k, v in flatten(cfg.sampler).items()}
    params.update({f"guidance.{k}": v for k, v in flatten(cfg.guidance).items()})
    params.update({f"eval.{k}": v for k, v in flatten(cfg.eval).items() if k not in ("cache_dir",)})
    params.update({"checkpoint": str(trained.path), "checkpoint_step": trained.step, "model.name": cfg.model.name,
                   "transport.path": cfg.transport.path, "transport.prediction": cfg.transport.prediction,
                   "run_name": cfg.run_name})
    return {k: str(v)[:500] for k, v in params.items()}


def log_evaluation(trained: Any, cfg: Any, result: EvalResult, grid: Path | None) -> tuple[str, str]:
    """A new MLflow run with the metrics, the sampling settings as params and the grid; returns (uri, run id)."""
    from mlflow.entities import Metric, Param

    from pipeline.config import tracking_uri
    from pipeline.tracking import client, ensure_experiment

    uri = tracking_uri(cfg)
    experiment_id = ensure_experiment(uri, cfg.tracking.experiment)
    c = client(uri)
    from pipeline.config import sampler_line

    tags = {"flowrail.job": "evaluate", "flowrail.checkpoint": str(trained.path),
            "flowrail.sampler": sampler_line(cfg.sampler, cfg.guidance)}  # the resolved sampler, in one line
    if trained.run_id:
        tags["flowrail.source_run_id"] = trained.run_id
    run = c.create_run(experiment_id, run_name=f"{cfg.run_name}-eval-step{trained.step}", tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    params = [Param(k, v) for k, v in sampling_params(cfg, trained).items()]
    for i in range(0, len(params), 90):
        c.log_batch(run_id, params=params[i:i + 90])
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, trained.step) for k, v in result.metrics.items()])
    if grid is not None:
        c.log_artifact(run_id, str(grid), artifact_path="samples")
    c.set_terminated(run_id, status="FINISHED")
    return uri, run_id
