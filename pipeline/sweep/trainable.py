"""One Tune trial = one Ray Train run (the Train V2 way): a function trainable that calls ``fit()`` with a
report callback, which has every checkpoint scored by a Ray task and forwards rank 0's metrics to Tune (ASHA)."""
from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback


class EvalReportCallback(TuneReportCallback):
    """Forward each checkpoint report to Tune with evaluation metrics added (``fd_pixels``, ...).

    The callback runs inside Ray Train V2's controller actor (no CPU, no GPU): the scoring itself is a separate Ray
    task (:func:`pipeline.sweep.evaluation.score_remotely`) asking for ``cpus`` and ``gpus``. Only checkpoint
    reports are forwarded, so every Tune result carries the metric ASHA ranks on; the loss curve between
    checkpoints goes to MLflow from the worker.
    """

    def __init__(self, metrics: list[str], num_samples: int, seed: int, cpus: float = 0.5, gpus: float = 0) -> None:
        super().__init__()
        self.metrics, self.num_samples, self.seed = list(metrics), num_samples, seed
        self.cpus, self.gpus = cpus, gpus

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is None:
            return
        from pipeline.sweep.evaluation import score_remotely

        out = dict(metrics[0])
        try:
            scored = score_remotely(checkpoint, self.metrics, self.num_samples, self.seed, cpus=self.cpus,
                                    gpus=self.gpus)
            scored.pop("step", None)
            out.update(scored)
        except Exception as exc:  # noqa: BLE001 - Ray swallows callback errors: say it, forward the rest
            print(f"[flowrail] evaluation of checkpoint {checkpoint.path} failed: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
        super().after_report(run_context, [out], checkpoint)


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep: dict[str, Any], store: dict[str, str]) -> None:
    """Tune function trainable: ``params`` are the sampled dotted training keys; ``store["uri"]`` the MLflow store
    (set on the in-memory config only: checkpoints write configs without it)."""
    import ray.tune

    from pipeline.config import TrainJobConfig
    from pipeline.sweep.config import trial_config
    from pipeline.train.trainer import fit

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(TrainJobConfig.model_validate(base), params, run_name=f"{sweep['name']}-{trial_id}")
    cfg.tracking.tracking_uri = store["uri"]
    tags = {"mlflow.parentRunId": sweep["parent_run_id"], "flowrail.job": "sweep_trial",
            "flowrail.sweep": sweep["name"], "flowrail.sweep_parent": sweep["parent_run_id"],
            "flowrail.trial_id": trial_id}
    callback = EvalReportCallback(sweep["metrics"], sweep["num_samples"], sweep["seed"], cpus=sweep["eval_cpus"],
                                  gpus=1 if cfg.train.use_gpu else 0)
    out = fit(cfg, tags=tags, make_grid=True, callbacks=[callback])
    if not out.new_checkpoint:
        forward_final_checkpoint(callback, out)


def forward_final_checkpoint(callback: EvalReportCallback, out: Any) -> None:
    """Score the run's final checkpoint and report it to Tune: a trial restarted by ``sweep --resume`` whose run had
    already stored its last checkpoint trains no step and reports nothing, while Tune's saved experiment state (it
    is written at most every 10 s, and less often for large sweeps) may hold an older result of it or none. Without
    this the resumed sweep would rank the trial by a stale metric."""
    import ray.tune

    from pipeline.sweep.evaluation import score_remotely

    result = dict(out.metrics)
    scored = score_remotely(out.stored_checkpoint or out.checkpoint, callback.metrics, callback.num_samples,
                            callback.seed, cpus=callback.cpus, gpus=callback.gpus)
    step = scored.pop("step")  # the checkpoint's own step, if the run's stored metrics lack it
    result.update(scored)
    result.setdefault("step", step)
    stored = out.stored_checkpoint
    result[CHECKPOINT_PATH_KEY] = stored.path if stored is not None else str(out.checkpoint)  # as the callback does
    ray.tune.report(result)
