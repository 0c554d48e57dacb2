"""``flowrail sweep CONFIG [key=value ...]``: Ray Tune trials (each a Ray Train run) with ASHA, a sampling sweep
on the best checkpoints, a ranked summary in MLflow, and (when ``register.enabled``) the registry handoff."""
from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    from pipeline.sweep.config import load_sweep_config
    from pipeline.sweep.run import run_sweep

    parser = argparse.ArgumentParser(prog="flowrail sweep", description=__doc__)
    parser.add_argument("config", help="a sweep config name in jobs/configs/ (e.g. sweep) or a YAML path")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides of the sweep config, e.g. tune.max_concurrent=1 overrides.train.steps=50")
    args = parser.parse_args(argv)
    result = run_sweep(load_sweep_config(args.config, args.overrides))
    print(f"[flowrail] sweep done: parent MLflow run {result.parent_run_id}; summary {result.summary_csv}")
    for reg in result.registered:
        print(f"[flowrail] models:/{reg.name}@{reg.aliases[0]} -> version {reg.version}")
    return 0
