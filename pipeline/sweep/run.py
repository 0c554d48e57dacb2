"""The sweep driver: parent MLflow run → Tune trials (ASHA) → sampling sweep on the best checkpoints → summary →
optional registration of the best (checkpoint, sampler) as ``champion`` and the runner-up as ``challenger``."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import TrainJobConfig, tracking_uri
from pipeline.errors import FlowrailError
from pipeline.sweep.config import SweepConfig, base_train_config
from pipeline.sweep.summary import Row, rank_rows, write_summary


@dataclass
class TrialOutcome:
    trial_id: str
    params: dict[str, Any]
    run_id: str
    checkpoint: Path | None
    step: int
    metrics: dict[str, float]
    status: str  # completed | stopped (ASHA) | failed


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    trials: list[TrialOutcome]
    rows: list[Row]
    summary_csv: Path
    registered: list[Any] = field(default_factory=list)


def run_sweep(cfg: SweepConfig) -> SweepResult:
    base = base_train_config(cfg)
    uri = tracking_uri(base)
    base.tracking.tracking_uri = uri  # trials run in other processes: pin the store they write to
    out_dir = Path(base.run_dir) / "sweeps" / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    parent = _start_parent(cfg, base, uri)
    print(f"[flowrail] sweep {cfg.name}: parent MLflow run {parent} at {uri}", flush=True)
    try:
        trials = _run_trials(cfg, base, parent, uri)
        rows = [Row.from_trial(t, cfg.tune.metric) for t in trials]
        rows += _sampling_sweep(cfg, trials, parent, uri, out_dir)
        rows = rank_rows(rows, cfg.tune.metric, cfg.tune.mode)
        csv = write_summary(rows, out_dir / "summary.csv", cfg.tune.metric)
        from pipeline.tracking import client

        c = client(uri)
        c.log_artifact(parent, str(csv), artifact_path="summary")
        ranked = [r for r in rows if r.rank is not None]
        if ranked:
            c.log_metric(parent, f"best_{cfg.tune.metric}", ranked[0].metric)
            c.set_tag(parent, "flowrail.best_run", ranked[0].run_id)
        c.log_metric(parent, "trials_stopped", sum(t.status == "stopped" for t in trials))
        c.log_metric(parent, "trials_completed", sum(t.status == "completed" for t in trials))
        result = SweepResult(parent, uri, trials, rows, csv)
        if cfg.registry.enabled:
            result.registered = register_best(cfg, rows, uri, parent)
        c.set_terminated(parent, status="FINISHED")
        return result
    except BaseException:
        from pipeline.tracking import mark_terminated

        mark_terminated(uri, parent, "FAILED")  # guarded: a server that is gone too must not hide the error
        raise


def _start_parent(cfg: SweepConfig, base: TrainJobConfig, uri: str) -> str:
    from mlflow.entities import Param

    from pipeline.tracking import client, ensure_experiment

    c = client(uri)
    exp = ensure_experiment(uri, base.tracking.experiment)
    run = c.create_run(exp, run_name=cfg.name, tags={"flowrail.job": "sweep", "flowrail.sweep": cfg.name})
    params = {f"space.{k}": str(v)[:500] for k, v in cfg.space.items()}
    params.update({f"tune.{k}": str(v) for k, v in cfg.tune.model_dump().items()})
    params.update({f"eval.{k}": str(v) for k, v in cfg.eval.model_dump().items()})
    params["sampling.top_k"] = str(cfg.sampling.top_k)
    params["sampling.configs"] = str([v.label for v in cfg.sampling.configs])[:500]
    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


def _run_trials(cfg: SweepConfig, base: TrainJobConfig, parent: str, uri: str) -> list[TrialOutcome]:
    from ray import tune

    from pipeline.sweep.space import scheduler, searcher, tune_space
    from pipeline.sweep.trainable import run_trial
    from pipeline.train.trainer import init_ray

    init_ray()
    # a trial's last result ("done") carries no metric, and a checkpoint whose evaluation failed neither
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    sweep = {"name": cfg.name, "parent_run_id": parent, "metrics": cfg.eval.metrics,
             "num_samples": cfg.eval.num_samples, "seed": cfg.eval.seed}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base.model_dump(mode="json"), sweep=sweep),
                                    {"CPU": cfg.tune.trial_cpus})
    tuner = tune.Tuner(
        trainable, param_space=tune_space(cfg.space),
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=cfg.tune.max_concurrent, search_alg=searcher(cfg),
                                    scheduler=scheduler(cfg, base.train.steps)),
        run_config=tune.RunConfig(name=f"{cfg.name}-{parent[:8]}", storage_path=str(Path(base.run_dir) / "ray" / "tune"),
                                  verbose=1),
    )
    grid = tuner.fit()
    return [_outcome(res, base, uri, cfg) for res in grid]


def _outcome(res: Any, base: TrainJobConfig, uri: str, cfg: SweepConfig) -> TrialOutcome:
    """Collect one trial: its metrics, checkpoint and MLflow run; log its eval curve; close a stopped trial's run."""
    from pipeline.tracking import client

    history = res.metrics_dataframe
    last = dict(res.metrics or {})
    trial_id = str(last.get("trial_id") or Path(res.path).name)
    params = {k: v for k, v in (res.config or {}).items()}
    run_id = str(last.get("mlflow_run_id") or "")
    step = int(last.get("step") or 0)
    ckpt = last.get("checkpoint_path")
    if res.error is not None:
        status = "failed"
    elif step < base.train.steps:
        status = "stopped"
    else:
        status = "completed"
    metrics = {m: float(last[m]) for m in cfg.eval.metrics if m in last}
    if run_id:
        c = client(uri)
        if history is not None:
            from mlflow.entities import Metric

            points = [Metric(f"eval_{m}", float(row[m]), 0, int(row["step"]))
                      for _, row in history.iterrows() for m in cfg.eval.metrics
                      if m in row and row[m] == row[m]]
            if points:
                c.log_batch(run_id, metrics=points)
        c.set_tag(run_id, "flowrail.trial_status", status)
        if status != "completed" and c.get_run(run_id).info.status == "RUNNING":
            c.set_terminated(run_id, status="KILLED" if status == "stopped" else "FAILED")
        if ckpt:
            c.set_tag(run_id, "flowrail.checkpoint", str(ckpt))
    print(f"[flowrail] trial {trial_id} {params}: {status} at step {step}, {metrics}", flush=True)
    return TrialOutcome(trial_id, params, run_id, Path(ckpt) if ckpt else None, step, metrics, status)


def _sampling_sweep(cfg: SweepConfig, trials: list[TrialOutcome], parent: str, uri: str,
                    out_dir: Path) -> list[Row]:
    """Every sampler configuration on the checkpoints of the ``top_k`` best completed trials (nested runs)."""
    import torch
    from mlflow.entities import Metric, Param

    from pipeline.sampling import class_grid
    from pipeline.sweep.metric import evaluate, with_sampler
    from pipeline.tracking import client
    from pipeline.train.checkpoint import load_trained

    if not cfg.sampling.configs:
        return []
    done = [t for t in trials if t.status == "completed" and t.checkpoint and cfg.tune.metric in t.metrics]
    sign = 1 if cfg.tune.mode == "min" else -1
    best = sorted(done, key=lambda t: sign * t.metrics[cfg.tune.metric])[:cfg.sampling.top_k]
    c = client(uri)
    exp = c.get_run(parent).info.experiment_id
    rows = []
    for trial in best:
        trained = load_trained(trial.checkpoint)
        for variant in cfg.sampling.configs:
            sampler, guidance = variant.resolve(trained.config)
            model = with_sampler(trained, sampler, guidance)
            with torch.no_grad():
                metrics = evaluate(model, cfg.eval.metrics, cfg.eval.num_samples, cfg.eval.seed)
            run = c.create_run(exp, run_name=f"{trial.trial_id}:{variant.label}", tags={
                "mlflow.parentRunId": trial.run_id or parent, "flowrail.job": "sweep_sampling",
                "flowrail.sweep": cfg.name, "flowrail.sweep_parent": parent, "flowrail.trial_id": trial.trial_id,
                "flowrail.checkpoint": str(trial.checkpoint)})
            rid = run.info.run_id
            params = {f"sampler.{k}": str(v) for k, v in sampler.model_dump().items()}
            params.update({f"guidance.{k}": str(v) for k, v in guidance.model_dump().items()})
            params.update({f"trial.{k}": str(v) for k, v in trial.params.items()})
            c.log_batch(rid, params=[Param(k, v) for k, v in params.items()],
                        metrics=[Metric(k, float(v), 0, trained.step) for k, v in metrics.items()])
            grid, _ = class_grid(model, out_dir / "samples" / f"{trial.trial_id}-{_slug(variant.label)}.png",
                                 trained.config.samples.per_class, trained.config.samples.seed)
            c.log_artifact(rid, str(grid), artifact_path="samples")
            c.set_terminated(rid, status="FINISHED")
            print(f"[flowrail] sampling {trial.trial_id} {variant.label}: {metrics}", flush=True)
            rows.append(Row(kind="sampling", trial_id=trial.trial_id, run_id=rid, params=trial.params,
                            sampler=variant.label, sampler_settings=sampler.model_dump(),
                            guidance_settings=guidance.model_dump(), metric=metrics.get(cfg.tune.metric, math.nan),
                            nfe=metrics.get("nfe"), step=trained.step, status="completed",
                            checkpoint=trial.checkpoint, trial_run_id=trial.run_id))
    return rows


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in text)[:80]


def register_best(cfg: SweepConfig, rows: list[Row], uri: str, parent: str) -> list[Any]:
    """Register the best ranked row as ``champion`` and the best row of another trial (or sampler) as
    ``challenger``; each version is tagged with its metric, sampler settings and training choices."""
    from pipeline.registry import register

    ranked = [r for r in rows if r.rank is not None and r.checkpoint is not None]
    if not ranked:
        raise FlowrailError(f"sweep {cfg.name}: no completed trial to register")
    picks = [(ranked[0], cfg.registry.champion_alias)]
    if cfg.registry.challenger_alias:
        other = next((r for r in ranked[1:] if r.trial_id != ranked[0].trial_id), None) or \
            (ranked[1] if len(ranked) > 1 else None)
        if other is not None:
            picks.append((other, cfg.registry.challenger_alias))
    out = []
    for row, alias in picks:
        tags = {"flowrail.metric": cfg.tune.metric, cfg.tune.metric: row.metric, "flowrail.sweep": cfg.name,
                "flowrail.sweep_parent": parent, "flowrail.rank": row.rank, "flowrail.sampler": row.sampler,
                **{f"trial.{k}": v for k, v in row.params.items()}}
        reg = register(row.checkpoint, cfg.registry.name, uri, run_id=row.run_id, aliases=[alias],
                       sampler=row.sampler_settings, guidance=row.guidance_settings, tags=tags)
        print(f"[flowrail] registered {reg.name} v{reg.version} as @{alias} "
              f"({cfg.tune.metric}={row.metric:.4g}, {row.sampler})", flush=True)
        out.append(reg)
    return out
