"""Evaluation during training: every ``train.eval_every`` steps rank 0 evaluates the EMA weights in process,
with the same code as ``flowrail evaluate`` (:func:`evals.evaluate.evaluate_checkpoint`), and the metrics
(``fd_digits``, ``precision``, ``recall``, ``classifier_accuracy``, ...) join that step's report, so Ray Tune
schedulers (ASHA) can stop trials on them."""
from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.config import TrainJobConfig
from pipeline.data.streaming import DataInfo


def due(step: int, every: int, last: bool) -> bool:
    return every > 0 and (step % every == 0 or last)


def evaluate_ema(cfg: TrainJobConfig, ema_model: nn.Module, objective: Any, info: DataInfo, step: int) -> dict[str, float]:
    """Metrics of the EMA model at ``step`` (sampling settings from ``cfg.sampler``/``cfg.guidance``)."""
    from evals.evaluate import evaluate_checkpoint
    from pipeline.train.checkpoint import Trained

    eval_cfg = cfg.model_copy(deep=True)
    eval_cfg.eval.num_workers = 1  # in this worker's process: no extra Ray resources during training
    trained = Trained(config=eval_cfg, model=ema_model, objective=objective, data=info, step=step, path=None)
    metrics = evaluate_checkpoint(trained, eval_cfg)
    return {k: float(v) for k, v in metrics.items() if k not in ("eval_samples",)}
