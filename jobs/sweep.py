"""``flowrail sweep CONFIG [key=value ...]``: Ray Tune trials (each a Ray Train run) with ASHA, a search over
sampling choices on the best checkpoints, a ranked summary and ``best_config.yaml`` in MLflow, and (when
``registry.enabled``) the registry handoff with a promotion gate.

``flowrail sweep --resume NAME [--run-dir DIR]`` continues the interrupted sweep NAME (saved under
``DIR/sweeps/NAME``): finished trials are reused, unfinished ones continue from their last checkpoint.
"""
from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    from pipeline.config import ConfigError
    from pipeline.sweep.config import SweepConfig, load_sweep_config
    from pipeline.sweep.run import run_sweep

    parser = argparse.ArgumentParser(prog="flowrail sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="a sweep config name in jobs/configs/ (e.g. sweep) or a YAML path")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides of the sweep config, e.g. tune.max_concurrent=1 overrides.train.steps=50")
    parser.add_argument("--resume", metavar="NAME", help="continue the interrupted sweep NAME")
    parser.add_argument("--run-dir", default="runs", help="where --resume looks for NAME (default: ./runs)")
    args = parser.parse_intermixed_args(argv)
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume NAME takes no config or overrides (the sweep's saved config is used)")
        from pathlib import Path

        from pipeline.sweep.state import load_state

        state = load_state(Path(args.run_dir).resolve(), args.resume)
        result = run_sweep(SweepConfig.model_validate(state.config), resume=state)
    else:
        if not args.config:
            raise ConfigError("flowrail sweep needs a CONFIG (or --resume NAME)")
        result = run_sweep(load_sweep_config(args.config, args.overrides))
    print(f"[flowrail] sweep done: parent MLflow run {result.parent_run_id}; summary {result.summary_csv}")
    for reg in result.registered:
        print(f"[flowrail] models:/{reg.name}@{reg.aliases[0]} -> version {reg.version}")
    return 0
