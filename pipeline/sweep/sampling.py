"""The sampling search: evaluation-time choices (diffusion form x norm, ODE/SDE, solver, steps, guidance scale and
interval) searched on the best trials' checkpoints, without retraining.

For each checkpoint the fixed ``sampling.configs`` are evaluated first (and told to the searcher), then
``sampling.num_samples`` configurations are drawn from ``sampling.space`` by Optuna's TPE (or at random) and scored
on the same metric and protocol as the trials (:func:`pipeline.sweep.evaluation.score_remotely`, a Ray task).
A drawn combination the sampler refuses (an SDE with an ODE-only solver) is pruned, not scored. Every scored
configuration is a nested MLflow run under its trial's run.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import FlowrailError
from pipeline.sweep.summary import Row


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Draw one value per dotted key from an Optuna trial (``choice``, ``uniform``, ``loguniform``, ``randint``)."""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            out[key] = trial.suggest_categorical(key, list(values))
        elif kind == "uniform":
            out[key] = trial.suggest_float(key, float(values[0]), float(values[1]))
        elif kind == "loguniform":
            out[key] = trial.suggest_float(key, float(values[0]), float(values[1]), log=True)
        else:  # randint: [low, high)
            out[key] = trial.suggest_int(key, int(values[0]), int(values[1]) - 1)
    return out


def split(dotted: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{"sampler.steps": 8, "guidance.scale": 2}`` -> ``({"steps": 8}, {"scale": 2})``."""
    sampler = {k.split(".", 1)[1]: v for k, v in dotted.items() if k.startswith("sampler.")}
    guidance = {k.split(".", 1)[1]: v for k, v in dotted.items() if k.startswith("guidance.")}
    return sampler, guidance


def label(sampler: dict[str, Any], guidance: dict[str, Any]) -> str:
    parts = [f"{k}={_short(v)}" for k, v in sampler.items()] + [f"cfg{k}={_short(v)}" for k, v in guidance.items()]
    return ",".join(parts) or "default"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def candidates(cfg: Any, base_sampler: Any, base_guidance: Any) -> Iterator[tuple[str, dict, dict, Any]]:
    """``(label, sampler, guidance, tell)`` for the fixed configs, then for the searched ones; ``tell(value)``
    reports a score (``None``: the configuration was refused) to the searcher."""
    import optuna

    from pipeline.config import resolve_sampler

    s = cfg.sampling
    if s.searcher == "optuna":
        sampler_algo = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=min(4, max(s.num_samples // 2, 1)))
    else:
        sampler_algo = optuna.samplers.RandomSampler(seed=s.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if cfg.tune.mode == "min" else "maximize", sampler=sampler_algo)

    def teller(trial: Any):  # noqa: ANN202
        def tell(value: float | None) -> None:
            if value is None or not math.isfinite(value):
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, value)
        return tell

    for variant in s.configs:
        sampler, guidance = variant.resolve_dicts(base_sampler, base_guidance)
        fixed = {f"sampler.{k}": sampler[k] for k in variant.sampler}
        fixed.update({f"guidance.{k}": guidance[k] for k in variant.guidance})
        known = {k: v for k, v in fixed.items() if k in s.space}
        if len(known) == len(s.space) and known and _inside(known, s.space):
            study.enqueue_trial(known)  # the searcher learns from the fixed configs it can express
            trial = study.ask()
            suggest(trial, s.space)  # records the enqueued values as the trial's parameters
            yield variant.label, sampler, guidance, teller(trial)
        else:
            yield variant.label, sampler, guidance, (lambda value: None)
    for _ in range(s.num_samples):
        trial = study.ask()
        drawn = suggest(trial, s.space)
        ds, dg = split(drawn)
        try:
            s_cfg, g_cfg = resolve_sampler(base_sampler, base_guidance, ds, dg, where="sampling search")
            sampler, guidance = s_cfg.model_dump(), g_cfg.model_dump()
            if guidance["t_min"] > guidance["t_max"]:
                raise ValueError("guidance interval t_min > t_max")
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            print(f"[flowrail] sampling search: pruned {label(ds, dg)} ({str(exc).splitlines()[0]})", flush=True)
            teller(trial)(None)
            continue
        yield label(ds, dg), sampler, guidance, teller(trial)


def _inside(values: dict[str, Any], space: dict[str, dict[str, Any]]) -> bool:
    for key, v in values.items():
        kind, spec = next(iter(space[key].items()))
        if kind == "choice" and v not in spec:
            return False
        if kind == "randint" and not (isinstance(v, int) and spec[0] <= v < spec[1]):
            return False
        if kind in ("uniform", "loguniform") and not (isinstance(v, (int, float)) and spec[0] <= v <= spec[1]):
            return False
    return True


def sampling_search(cfg: Any, trials: list[Any], parent: str, uri: str, out_dir: Path,
                    gpus: float = 0) -> list[Row]:
    """Score sampler configurations on the checkpoints of the ``sampling.top_k`` best completed trials."""
    from mlflow.entities import Metric, Param

    from pipeline.sweep.evaluation import score_remotely
    from pipeline.tracking import client
    from pipeline.train.checkpoint import read_meta

    s = cfg.sampling
    if not s.configs and not (s.space and s.num_samples):
        return []
    done = [t for t in trials if t.status == "completed" and t.checkpoint and cfg.tune.metric in t.metrics]
    sign = 1 if cfg.tune.mode == "min" else -1
    best = sorted(done, key=lambda t: sign * t.metrics[cfg.tune.metric])[:s.top_k]
    c = client(uri)
    exp = c.get_run(parent).info.experiment_id
    rows = []
    for trial in best:
        meta = read_meta(trial.checkpoint)
        base_sampler, base_guidance = meta["config"]["sampler"], meta["config"]["guidance"]
        for name, sampler, guidance, tell in candidates(cfg, base_sampler, base_guidance):
            try:
                metrics = score_remotely(str(trial.checkpoint), cfg.eval.metrics, cfg.eval.num_samples,
                                         cfg.eval.seed, cpus=cfg.eval.cpus, gpus=gpus, sampler=sampler,
                                         guidance=guidance)
            except Exception as exc:  # noqa: BLE001 - one failing configuration must not end the search
                print(f"[flowrail] sampling {trial.trial_id} {name} failed: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
                tell(None)
                continue
            value = float(metrics.get(cfg.tune.metric, math.nan))
            tell(value)
            step = int(metrics.pop("step", 0))
            metrics.pop("mlflow_run_id", None)
            run = c.create_run(exp, run_name=f"{trial.trial_id}:{name}"[:250], tags={
                "mlflow.parentRunId": trial.run_id or parent, "flowrail.job": "sweep_sampling",
                "flowrail.sweep": cfg.name, "flowrail.sweep_parent": parent, "flowrail.trial_id": trial.trial_id,
                "flowrail.checkpoint": str(trial.checkpoint), "flowrail.sampler_label": name[:250]})
            rid = run.info.run_id
            params = {f"sampler.{k}": str(v) for k, v in sampler.items()}
            params.update({f"guidance.{k}": str(v) for k, v in guidance.items()})
            params.update({f"trial.{k}": str(v) for k, v in trial.params.items()})
            c.log_batch(rid, params=[Param(k, v[:500]) for k, v in params.items()],
                        metrics=[Metric(k, float(v), 0, step) for k, v in metrics.items()
                                 if isinstance(v, (int, float))])
            c.set_terminated(rid, status="FINISHED")
            print(f"[flowrail] sampling {trial.trial_id} {name}: {cfg.tune.metric}={value:.5g}", flush=True)
            rows.append(Row(kind="sampling", trial_id=trial.trial_id, run_id=rid, params=trial.params, sampler=name,
                            sampler_settings=sampler, guidance_settings=guidance, metric=value,
                            nfe=metrics.get("nfe"), step=step, status="completed", checkpoint=trial.checkpoint,
                            trial_run_id=trial.run_id))
    return rows


def write_best_config(cfg: Any, best: Row, path: Path) -> Path:
    """``best_config.yaml``: the best row's training config (its checkpoint's, credentials and tracking URI
    removed) and, next to it, the sampler/guidance settings it was scored with and the metric protocol."""
    import yaml

    from pipeline.tracking import shareable_config
    from pipeline.train.checkpoint import read_meta

    if best.checkpoint is None:
        raise FlowrailError(f"sweep {cfg.name}: the best row has no checkpoint")
    train = shareable_config(read_meta(best.checkpoint)["config"])
    sampler = best.sampler_settings or train["sampler"]
    guidance = best.guidance_settings or train["guidance"]
    doc = {"sweep": cfg.name, "metric": {"name": cfg.tune.metric, "mode": cfg.tune.mode, "value": best.metric,
                                          **protocol(cfg, train)},
           "trial": {"id": best.trial_id, "params": best.params, "mlflow_run_id": best.trial_run_id or best.run_id,
                     "checkpoint": str(best.checkpoint), "step": best.step},
           "sampler": sampler, "guidance": guidance, "train": {**train, "sampler": sampler, "guidance": guidance}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def protocol(cfg: Any, train_config: dict[str, Any]) -> dict[str, Any]:
    """The sweep's selection protocol (:func:`pipeline.promotion.eval_protocol` on the ``select`` half of the
    validation set); the promotion gate re-scores on the held-out ``gate`` half with its own seeds."""
    from pipeline.promotion import eval_protocol

    return eval_protocol(cfg.eval.num_samples, cfg.eval.seed, train_config, split="select")
