"""One Tune trial = one Ray Train run (the Train V2 way): a function trainable that calls ``fit()`` with a
report callback, which scores every checkpoint and forwards rank 0's metrics to Tune (and so to ASHA)."""
from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback


class EvalReportCallback(TuneReportCallback):
    """Forward each checkpoint report to Tune with evaluation metrics added (``fd_pixels``, ...).

    Only checkpoint reports are forwarded, so every Tune result carries the metric ASHA ranks on; the loss curve
    between checkpoints goes to MLflow from the worker.
    """

    def __init__(self, metrics: list[str], num_samples: int, seed: int) -> None:
        super().__init__()
        self.metrics, self.num_samples, self.seed = list(metrics), num_samples, seed

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is None:
            return
        import torch

        from pipeline.sweep.metric import evaluate
        from pipeline.train.checkpoint import load_trained

        out = dict(metrics[0])
        try:
            with checkpoint.as_directory() as ckpt_dir:
                trained = load_trained(ckpt_dir)
                with torch.no_grad():
                    out.update(evaluate(trained, self.metrics, self.num_samples, self.seed))
            out["mlflow_run_id"] = trained.run_id or ""
        except Exception as exc:  # noqa: BLE001 - Ray swallows callback errors: say it, forward the rest
            print(f"[flowrail] evaluation of checkpoint {checkpoint.path} failed: {type(exc).__name__}: {exc}",
                  flush=True)
        super().after_report(run_context, [out], checkpoint)


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune function trainable: ``params`` are the sampled dotted training keys."""
    import ray.tune

    from pipeline.config import TrainJobConfig
    from pipeline.sweep.config import trial_config
    from pipeline.train.trainer import fit

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(TrainJobConfig.model_validate(base), params, run_name=f"{sweep['name']}-{trial_id}")
    tags = {"mlflow.parentRunId": sweep["parent_run_id"], "flowrail.job": "sweep_trial",
            "flowrail.sweep": sweep["name"], "flowrail.sweep_parent": sweep["parent_run_id"],
            "flowrail.trial_id": trial_id}
    callback = EvalReportCallback(sweep["metrics"], sweep["num_samples"], sweep["seed"])
    fit(cfg, tags=tags, make_grid=True, callbacks=[callback])
