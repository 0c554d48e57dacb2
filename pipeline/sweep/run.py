"""The sweep driver: parent MLflow run → Tune trials (ASHA) → sampling sweep on the best checkpoints → summary →
optional registration of the best (checkpoint, sampler) as ``champion`` and the runner-up as ``challenger``."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import TrainJobConfig, tracking_uri
from pipeline.errors import FlowrailError
from pipeline.sweep.config import SweepConfig, base_train_config
from pipeline.sweep.sampling import sampling_search, write_best_config
from pipeline.sweep.state import SweepState, check_same_store, save_state
from pipeline.sweep.summary import Row, rank_rows, write_summary
from pipeline.tracking import redact


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


def run_sweep(cfg: SweepConfig, resume: SweepState | None = None) -> SweepResult:
    """Run the sweep ``cfg`` (or continue the interrupted one ``resume``: Tune restores its experiment, finished
    trials keep their results and are not run again, unfinished ones continue from their last checkpoint)."""
    base = base_train_config(cfg)
    if "fd_pixels" in cfg.eval.metrics:  # refused before any trial starts, not inside the first scoring task
        from pipeline.sweep.metric import check_fd_pixels_shards

        check_fd_pixels_shards(base.data.val_shards or base.data.shards, base.data.image_size)
    from pipeline.console import is_verbose, quiet_driver_logs

    if not is_verbose(base):  # Ray's start-up, Tune's and MLflow's INFO lines; `flowrail --verbose` shows them
        quiet_driver_logs()
    uri = tracking_uri(base)
    # trials run in other processes: the store travels to them through Ray's object store (tune.with_parameters),
    # never inside their config, which lands in checkpoints, Tune's experiment files and registered artifacts
    base.tracking.tracking_uri = None
    out_dir = Path(base.run_dir) / "sweeps" / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        check_same_store(resume, uri)
        parent, tune_dir = resume.parent_run_id, Path(resume.tune_dir)
        from pipeline.tracking import client

        client(uri).update_run(parent, status="RUNNING")
    else:
        parent = _start_parent(cfg, base, uri)
        tune_dir = Path(base.run_dir) / "ray" / "tune" / f"{cfg.name}-{parent[:8]}"
        save_state(base.run_dir, cfg, parent, tune_dir, uri)
    print(f"[flowrail] sweep {cfg.name}: {'resumed' if resume else 'parent'} MLflow run {parent} at {redact(uri)}",
          flush=True)
    try:
        trials = _run_trials(cfg, base, parent, uri, tune_dir, resume is not None)
        rows = [Row.from_trial(t, cfg.tune.metric) for t in trials]
        rows += sampling_search(cfg, trials, parent, uri, out_dir, gpus=1 if base.train.use_gpu else 0)
        rows = rank_rows(rows, cfg.tune.metric, cfg.tune.mode)
        csv = write_summary(rows, out_dir / "summary.csv", cfg.tune.metric)
        from pipeline.tracking import client

        c = client(uri)
        c.log_artifact(parent, str(csv), artifact_path="summary")
        ranked = [r for r in rows if r.rank is not None]
        if ranked:
            c.log_metric(parent, f"best_{cfg.tune.metric}", ranked[0].metric)
            c.set_tag(parent, "flowrail.best_run", ranked[0].run_id)
            best_yaml = write_best_config(cfg, ranked[0], out_dir / "best_config.yaml")
            c.log_artifact(parent, str(best_yaml), artifact_path="best")
            print(f"[flowrail] best config ({cfg.tune.metric}={ranked[0].metric:.5g}, {ranked[0].sampler}): "
                  f"{best_yaml}", flush=True)
        c.log_metric(parent, "trials_stopped", sum(t.status == "stopped" for t in trials))
        c.log_metric(parent, "trials_completed", sum(t.status == "completed" for t in trials))
        result = SweepResult(parent, uri, trials, rows, csv)
        if cfg.registry.enabled:
            result.registered = register_best(cfg, rows, uri, parent, gpus=1 if base.train.use_gpu else 0)
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
    params.update({f"sampling.space.{k}": str(v)[:500] for k, v in cfg.sampling.space.items()})
    params.update({"sampling.searcher": cfg.sampling.searcher, "sampling.num_samples": str(cfg.sampling.num_samples)})
    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


def _run_trials(cfg: SweepConfig, base: TrainJobConfig, parent: str, uri: str, tune_dir: Path,
                resume: bool) -> list[TrialOutcome]:
    from ray import tune

    from pipeline.console import is_verbose, quiet_ray_logs
    from pipeline.sweep.console import TrialTable
    from pipeline.sweep.space import scheduler, searcher, tune_space
    from pipeline.sweep.trainable import run_trial
    from pipeline.cluster import init_ray

    verbose = is_verbose(base)
    if not verbose:  # a trial table in place of Tune's reporter (pipeline/sweep/console.py)
        # Tune's new output engine prints its experiment box even at verbose=0; the legacy one is silent there
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        quiet_ray_logs()
    init_ray()
    # a trial's last result ("done") carries no metric, and a checkpoint whose evaluation failed neither
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    sweep = {"name": cfg.name, "parent_run_id": parent, "metrics": cfg.eval.metrics,
             "num_samples": cfg.eval.num_samples, "seed": cfg.eval.seed, "eval_cpus": cfg.eval.cpus}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base.model_dump(mode="json"), sweep=sweep,
                                                         store={"uri": uri}),
                                    {"CPU": cfg.tune.trial_cpus})
    if resume:
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
        return [_outcome(res, base, uri, cfg) for res in tuner.fit()]
    tuner = tune.Tuner(
        trainable, param_space=tune_space(cfg.space),
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=cfg.tune.max_concurrent, search_alg=searcher(cfg),
                                    scheduler=scheduler(cfg, base.train.steps)),
        run_config=tune.RunConfig(name=tune_dir.name, storage_path=str(tune_dir.parent), verbose=1 if verbose else 0,
                                  callbacks=None if verbose else [TrialTable(cfg.tune.metric, cfg.tune.mode)]),
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


def register_best(cfg: SweepConfig, rows: list[Row], uri: str, parent: str, gpus: float = 0) -> list[Any]:
    """Register the best ranked (checkpoint, sampler) row through the promotion gate: it and the current champion
    are re-scored together on the held-out half of the validation set with the gate's seeds (never the numbers the
    row was selected with); ``champion`` only if better beyond the seeds' spread, else ``challenger``."""
    from pipeline.gate import GateSpec
    from pipeline.registry import register

    ranked = [r for r in rows if r.rank is not None and r.checkpoint is not None]
    if not ranked:
        raise FlowrailError(f"sweep {cfg.name}: no completed trial to register")
    best = ranked[0]
    r = cfg.registry
    gate = GateSpec(cfg.tune.metric, r.gate_samples, tuple(r.gate_seeds), r.champion_alias,
                    r.challenger_alias or "challenger", cpus=cfg.eval.cpus, gpus=gpus, remote=True)
    tags = {"flowrail.sweep": cfg.name, "flowrail.sweep_parent": parent, "flowrail.sampler": best.sampler,
            f"flowrail.selection_{cfg.tune.metric}": repr(best.metric),  # the (selection-biased) sweep number
            **{f"trial.{k}": v for k, v in best.params.items()}}
    reg = register(best.checkpoint, cfg.registry.name, uri, run_id=best.trial_run_id or best.run_id,
                   sampler=best.sampler_settings, guidance=best.guidance_settings, tags=tags, gate=gate)
    print(f"[flowrail] registered {reg.name} v{reg.version} as @{reg.aliases[0]} ({reg.reason}; {best.sampler})",
          flush=True)
    return [reg]
