"""``flowrail register RUN_ID_OR_CHECKPOINT --name NAME [--promote-on METRIC | --alias A]``: log a checkpoint as an
MLflow pyfunc image generator, register a new version of NAME and point aliases at it.

``--promote-on METRIC`` scores the checkpoint first (METRIC on ``--eval-samples`` samples with ``--eval-seed``, against
its validation set: the sweep's protocol) and lets the promotion gate choose: ``@champion`` only if it beats the
current champion on the same metric and protocol, else ``@challenger`` (both numbers and the reason are recorded on
the version). ``--alias champion`` without the gate is refused unless ``--force-champion`` (recorded) is given.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

CHAMPION, CHALLENGER = "champion", "challenger"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowrail register", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="an MLflow run id of a flowrail training run, or a checkpoint directory")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--alias", action="append", default=[], help="alias to point at the new version (repeatable)")
    parser.add_argument("--promote-on", metavar="METRIC",
                        help="score the checkpoint on METRIC and let the promotion gate pick @champion or @challenger")
    parser.add_argument("--eval-samples", type=int, default=1000, help="samples for --promote-on (default 1000)")
    parser.add_argument("--eval-seed", type=int, default=0, help="sampling seed for --promote-on (default 0)")
    parser.add_argument("--eval-gpus", type=float, default=0.0,
                        help="score as a Ray task with this many GPUs (default 0: in this process, on its CPU)")
    parser.add_argument("--force-champion", action="store_true",
                        help="point @champion at the new version without the gate (recorded on the version)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking server (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment", default="flowrail", help="experiment for the logging run of a checkpoint path")
    parser.add_argument("--override-privacy-audit", action="store_true",
                        help="register a privacy-stage checkpoint whose audit has not passed (recorded on run and version)")
    parser.add_argument("--accept-loosened-audit", action="store_true",
                        help="register a privacy-stage checkpoint whose audit passed with loosened thresholds (recorded)")
    parser.add_argument("settings", nargs="*", help="sampler/guidance defaults, e.g. sampler.solver=heun guidance.scale=2")
    return parser


def check_gate_arguments(args: argparse.Namespace) -> None:
    """One line for combinations that would move ``@champion`` past the gate, or score nothing."""
    if args.promote_on and args.force_champion:
        raise ValueError("--promote-on and --force-champion contradict each other: the gate decides, or you do")
    if args.promote_on and {CHAMPION, CHALLENGER} & set(args.alias):
        raise ValueError(f"--alias {CHAMPION}/{CHALLENGER} with --promote-on: the gate decides which of the two the "
                         "new version gets")
    if CHAMPION in args.alias and not args.force_champion:
        raise ValueError("--alias champion would skip the promotion gate: pass --promote-on METRIC (champion only if "
                         "it beats the current one) or --force-champion (recorded on the version)")
    if args.promote_on:
        from evals.evaluate import KNOWN_METRICS
        from pipeline.sweep.metric import OWN_METRICS

        allowed = (*OWN_METRICS, *KNOWN_METRICS)
        if args.promote_on not in allowed:
            raise ValueError(f"--promote-on {args.promote_on}: unknown metric (allowed: {', '.join(allowed)})")
        if args.eval_samples < 1:
            raise ValueError(f"--eval-samples {args.eval_samples}: must be at least 1")


def gate_score(checkpoint: Path, args: argparse.Namespace, sampler: dict[str, Any] | None,
               guidance: dict[str, Any] | None) -> Any:
    """The checkpoint's :class:`pipeline.promotion.Score` on ``--promote-on`` under the sweep's protocol."""
    from pipeline.promotion import Score, eval_protocol, metric_mode
    from pipeline.sweep.evaluation import score_checkpoint, score_remotely
    from pipeline.train.checkpoint import read_meta

    metric = args.promote_on
    if args.eval_gpus > 0:
        out = score_remotely(str(checkpoint), [metric], args.eval_samples, args.eval_seed, cpus=1,
                             gpus=args.eval_gpus, sampler=sampler, guidance=guidance)
    else:
        out = score_checkpoint(checkpoint, [metric], args.eval_samples, args.eval_seed, sampler, guidance)
    train_config = read_meta(checkpoint)["config"]
    return Score(metric, float(out[metric]), metric_mode(metric),
                 eval_protocol(args.eval_samples, args.eval_seed, train_config))


def main(argv: list[str]) -> int:
    from pipeline.config import parse_overrides
    from pipeline.registry import register, resolve_checkpoint
    from pipeline.train.checkpoint import find_latest

    args = _parser().parse_intermixed_args(argv)
    if not args.tracking_uri:
        raise ValueError("no tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    check_gate_arguments(args)
    extra = parse_overrides(args.settings)
    unknown = set(extra) - {"sampler", "guidance"}
    if unknown:
        raise ValueError(f"register settings: unknown section(s) {sorted(unknown)} (allowed: sampler, guidance)")
    checkpoint, run_id = resolve_checkpoint(args.source, args.tracking_uri)
    from privacy.gate import require_audit_passed
    privacy_tags = require_audit_passed(checkpoint, override=args.override_privacy_audit, tracking_uri=args.tracking_uri,
                                        accept_loosened=args.accept_loosened_audit)
    tags = dict(privacy_tags)
    score, gate = None, None
    if args.promote_on:
        score = gate_score(find_latest(checkpoint), args, extra.get("sampler"), extra.get("guidance"))
        gate = (CHAMPION, CHALLENGER)
    elif args.force_champion:
        args.alias = [CHAMPION, *[a for a in args.alias if a != CHAMPION]]
        tags.update({"flowrail.promotion": "forced", "flowrail.promotion_reason": "--force-champion (no gate)"})
    reg = register(checkpoint, args.name, args.tracking_uri, run_id=run_id, experiment=args.experiment,
                   aliases=args.alias, sampler=extra.get("sampler"), guidance=extra.get("guidance"),
                   tags=tags, score=score, gate=gate)
    aliases = "".join(f" @{a}" for a in reg.aliases)
    why = f" ({reg.reason})" if reg.reason else ""
    print(f"[flowrail] registered {reg.name} version {reg.version}{aliases}{why} (run {reg.run_id}; {reg.model_uri})")
    return 0
