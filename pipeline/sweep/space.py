"""Search space: YAML distributions over dotted training keys -> a Ray Tune ``param_space`` and searcher."""
from __future__ import annotations

from typing import Any

from pipeline.sweep.config import SweepConfig


def tune_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"train.lr": {"loguniform": [a, b]}, ...}`` -> ``{"train.lr": tune.loguniform(a, b), ...}``."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid":
            out[key] = tune.grid_search(list(values))
        elif kind == "choice":
            out[key] = tune.choice(list(values))
        elif kind == "loguniform":
            out[key] = tune.loguniform(float(values[0]), float(values[1]))
        elif kind == "uniform":
            out[key] = tune.uniform(float(values[0]), float(values[1]))
        else:  # randint: [low, high)
            out[key] = tune.randint(int(values[0]), int(values[1]))
    return out


def grid_size(space: dict[str, dict[str, Any]]) -> int:
    """How many trials one pass over the grid dimensions makes (1 without grid dimensions)."""
    n = 1
    for spec in space.values():
        kind, values = next(iter(spec.items()))
        n *= len(values) if kind == "grid" else 1
    return n


def searcher(cfg: SweepConfig):  # noqa: ANN201
    """``None`` for Tune's basic variant generator, or a concurrency-limited Optuna TPE searcher."""
    if cfg.tune.searcher != "optuna":
        return None
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(metric=cfg.tune.metric, mode=cfg.tune.mode,
                          sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed))
    return ConcurrencyLimiter(search, max_concurrent=cfg.tune.max_concurrent)


def scheduler(cfg: SweepConfig, max_steps: int):  # noqa: ANN201
    """ASHA on ``tune.metric`` with the training step as time (or FIFO when disabled)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    a = cfg.tune.asha
    if not a.enabled:
        return FIFOScheduler()
    # max_t one past the last step: a trial that reaches the end finishes by itself (its Ray Train controller shuts
    # its workers down) instead of being stopped by the scheduler on its final report
    return ASHAScheduler(time_attr="step", max_t=max_steps + 1, grace_period=min(a.grace_period, max_steps),
                         reduction_factor=a.reduction_factor)
