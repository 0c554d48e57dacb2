"""``flowrail train [--config NAME|PATH] key=value ...``: train or fine-tune; re-running a run name resumes it."""
from __future__ import annotations

import argparse

from pipeline.config import TrainJobConfig, load_config


def parse(argv: list[str], default_config: str = "train") -> TrainJobConfig:
    parser = argparse.ArgumentParser(prog="flowrail train", description=__doc__)
    parser.add_argument("--config", default=default_config, help="a name in jobs/configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.zero_stage=3")
    args = parser.parse_args(argv)
    return load_config(TrainJobConfig, args.config, args.overrides)


def main(argv: list[str]) -> int:
    from pipeline.train.trainer import fit

    from pipeline.config import sampler_line

    cfg = parse(argv)
    print(f"[flowrail] sampler: {sampler_line(cfg.sampler, cfg.guidance)}", flush=True)  # as resolved (presets)
    result = fit(cfg)
    print(f"[flowrail] done: MLflow run {result.run_id}; checkpoint {result.checkpoint}")
    return 0
