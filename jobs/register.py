"""``flowrail register RUN_ID_OR_CHECKPOINT --name NAME [--alias champion]``: log a checkpoint as an MLflow pyfunc
image generator, register a new version of NAME and point the alias at it."""
from __future__ import annotations

import argparse
import os


def main(argv: list[str]) -> int:
    from pipeline.config import parse_overrides
    from pipeline.registry import register, resolve_checkpoint

    parser = argparse.ArgumentParser(prog="flowrail register", description=__doc__)
    parser.add_argument("source", help="an MLflow run id of a flowrail training run, or a checkpoint directory")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--alias", action="append", default=[], help="alias to point at the new version (repeatable)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking server (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment", default="flowrail", help="experiment for the logging run of a checkpoint path")
    parser.add_argument("--override-privacy-audit", action="store_true",
                        help="register a privacy-stage checkpoint whose audit has not passed (recorded on run and version)")
    parser.add_argument("settings", nargs="*", help="sampler/guidance defaults, e.g. sampler.solver=heun guidance.scale=2")
    args = parser.parse_intermixed_args(argv)
    if not args.tracking_uri:
        raise ValueError("no tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    extra = parse_overrides(args.settings)
    unknown = set(extra) - {"sampler", "guidance"}
    if unknown:
        raise ValueError(f"register settings: unknown section(s) {sorted(unknown)} (allowed: sampler, guidance)")
    checkpoint, run_id = resolve_checkpoint(args.source, args.tracking_uri)
    from privacy.gate import require_audit_passed
    privacy_tags = require_audit_passed(checkpoint, override=args.override_privacy_audit, tracking_uri=args.tracking_uri)
    reg = register(checkpoint, args.name, args.tracking_uri, run_id=run_id, experiment=args.experiment,
                   aliases=args.alias, sampler=extra.get("sampler"), guidance=extra.get("guidance"),
                   tags=privacy_tags)
    aliases = "".join(f" @{a}" for a in reg.aliases)
    print(f"[flowrail] registered {reg.name} version {reg.version}{aliases} (run {reg.run_id}; {reg.model_uri})")
    return 0
