"""``flowrail evaluate CHECKPOINT [key=value ...]``: evaluate any checkpoint with any sampler configuration.

CHECKPOINT is a checkpoint directory or a run directory (its newest checkpoint is used). Overrides apply over the
checkpoint's own config and may change only evaluation-time settings: ``sampler.*``, ``guidance.*``, ``eval.*``,
``samples.*``, ``tracking.*``, ``run_dir`` and FLUX's guidance-embedding value ``flux.guidance`` (e.g.
``sampler.method=sde sampler.diffusion=sigma sampler.steps=50 guidance.scale=1.5``). A setting the model family
would ignore is refused in one line (exit 2).
Logs the metrics, the sampler settings as params and a sample grid to a new MLflow run tagged with the source run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import (SHORTHANDS, ConfigError, TrainJobConfig, format_validation_error, layer_sampler,
                             parse_overrides)

EVAL_TIME_KEYS = ("sampler", "guidance", "eval", "samples", "tracking", "run_dir")
EVAL_TIME_FIELDS = ("flux.guidance",)  # single fields of otherwise training-time sections


def eval_config(checkpoint_config: dict, overrides: list[str]) -> TrainJobConfig:
    """The checkpoint's config with evaluation-time overrides applied (anything else is a one-line error)."""
    from pydantic import ValidationError

    for item in overrides:
        key = SHORTHANDS.get(item.split("=", 1)[0].strip(), item.split("=", 1)[0].strip())
        if key.split(".")[0] not in EVAL_TIME_KEYS and key not in EVAL_TIME_FIELDS:
            allowed = [k if k == "run_dir" else k + ".*" for k in EVAL_TIME_KEYS] + list(EVAL_TIME_FIELDS)
            raise ConfigError(f"override '{item}': evaluation can only change {', '.join(allowed)} "
                              "(the weights were trained with the rest)")
    tree = parse_overrides(overrides)
    try:
        # a preset given now replaces the checkpoint's stored sampler fields; keys given now win over the preset
        cfg = TrainJobConfig.model_validate(layer_sampler(checkpoint_config, tree))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, TrainJobConfig)) from None
    cfg.resolve_paths()
    if cfg.eval.cache_dir:
        cfg.eval.cache_dir = str(Path(cfg.eval.cache_dir).expanduser().resolve())
    return cfg


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flowrail evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run directory (newest checkpoint)")
    parser.add_argument("overrides", nargs="*", help="sampler.*, guidance.*, eval.*, samples.*, tracking.* overrides")
    parser.add_argument("--override-privacy-audit", action="store_true",
                        help="evaluate (and log a grid of) a privacy-stage checkpoint whose audit has not passed "
                             "(recorded on its training run)")
    parser.add_argument("--accept-loosened-audit", action="store_true",
                        help="evaluate a privacy-stage checkpoint whose audit passed only with thresholds looser than "
                             "the defaults")
    args = parser.parse_intermixed_args(argv)

    from evals.evaluate import examples_grid, log_evaluation, metrics_table, run_evaluation
    from pipeline.config import sampler_line, tracking_uri
    from pipeline.tracking import redact
    from pipeline.console import is_verbose, quiet_driver_logs
    from pipeline.train.checkpoint import find_latest, load_trained, read_meta
    from privacy.gate import require_audit_passed

    if not is_verbose():  # Ray's start-up and MLflow's store INFO lines; `flowrail --verbose` shows them
        quiet_driver_logs()
    ckpt = find_latest(args.checkpoint)
    cfg = eval_config(read_meta(ckpt)["config"], args.overrides)
    # a privacy-stage model's samples leave the stage (grid and metrics in MLflow) only after a passing audit
    require_audit_passed(ckpt, override=args.override_privacy_audit, tracking_uri=tracking_uri(cfg),
                         accept_loosened=args.accept_loosened_audit)
    trained = load_trained(ckpt, overrides=cfg)
    result = run_evaluation(trained, cfg, show_progress=True)
    grid = examples_grid(result.examples, trained.num_classes,
                         Path(cfg.run_dir) / "evaluations" / cfg.run_name / f"eval_step{trained.step:07d}.png")
    uri, run_id = log_evaluation(trained, cfg, result, grid)
    print(f"[flowrail] evaluate {ckpt} (step {trained.step}; sampler {sampler_line(cfg.sampler, cfg.guidance)}):\n"
          f"{metrics_table(result.metrics)}")
    print(f"[flowrail] MLflow run {run_id} at {redact(uri)}" + (f"; grid {grid}" if grid else ""))
    return 0
