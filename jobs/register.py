"""``flowrail register RUN_ID_OR_CHECKPOINT --name NAME [--promote-on METRIC | --alias A]``: log a checkpoint as an
MLflow pyfunc image generator, register a new version of NAME and point aliases at it.

``--promote-on METRIC`` runs the promotion gate (:mod:`pipeline.promotion`, the same protocol as the sweep's): the
checkpoint and the current champion are scored together on METRIC (``--eval-samples`` samples for each of
``--eval-seeds``, against the held-out half of the validation set), and the new version becomes ``@champion`` only
if it is better beyond the seeds' spread, else ``@challenger`` (the numbers and the reason are recorded on the
version). ``--alias champion`` without the gate is refused unless ``--force-champion`` (recorded) is given; a forced
champion is scored too (on ``--promote-on`` METRIC, default fd_pixels), so a later candidate can be compared with it.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from pipeline.promotion import GATE_METRIC, GATE_SAMPLES, GATE_SEEDS

CHAMPION, CHALLENGER = "champion", "challenger"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowrail register", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="an MLflow run id of a flowrail training run, or a checkpoint directory")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--alias", action="append", default=[], help="alias to point at the new version (repeatable)")
    parser.add_argument("--promote-on", metavar="METRIC",
                        help="score the checkpoint (and re-score the champion) on METRIC; the promotion gate picks "
                             "@champion or @challenger")
    parser.add_argument("--eval-samples", type=int, default=GATE_SAMPLES,
                        help=f"samples per seed for the gate (default {GATE_SAMPLES}, as the sweep's)")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=list(GATE_SEEDS),
                        help=f"sampling seeds for the gate, >= 2 (default {' '.join(map(str, GATE_SEEDS))})")
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
    if args.promote_on or args.force_champion:
        from pipeline.gate import GateSpec

        GateSpec(args.promote_on or GATE_METRIC, args.eval_samples, tuple(args.eval_seeds)).check()


def forced_metric(checkpoint: Any) -> tuple[str | None, str]:
    """The metric a ``--force-champion`` version is scored on without ``--promote-on``: the gate's default when it
    applies to the checkpoint's data (a readable validation set within fd_pixels' dimension cap); else (None, why)."""
    from pipeline.errors import FlowrailError
    from pipeline.sweep.metric import check_fd_pixels_shards
    from pipeline.train.checkpoint import find_latest, read_meta

    data = read_meta(find_latest(checkpoint))["config"]["data"]
    try:
        check_fd_pixels_shards(data.get("val_shards") or data["shards"], data.get("image_size"))
    except (FlowrailError, OSError, ValueError) as exc:
        return None, " ".join(str(exc).split())[:200]
    return GATE_METRIC, ""


def main(argv: list[str]) -> int:
    from pipeline.config import parse_overrides
    from pipeline.registry import register, resolve_checkpoint

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
    gate = None
    metric, why_not = (args.promote_on, "") if args.promote_on or not args.force_champion \
        else forced_metric(checkpoint)
    if metric:
        from pipeline.gate import GateSpec

        gate = GateSpec(metric, args.eval_samples, tuple(args.eval_seeds), CHAMPION, CHALLENGER, cpus=1,
                        gpus=args.eval_gpus, remote=args.eval_gpus > 0, force=args.force_champion)
    if args.force_champion:
        args.alias = [CHAMPION, *[a for a in args.alias if a != CHAMPION]]
        unscored = "" if metric else f"; not scored ({GATE_METRIC}: {why_not}; pass --promote-on METRIC), so " \
                                     "the gate re-scores it from its checkpoint when a candidate comes"
        tags.update({"flowrail.promotion": "forced", "flowrail.promotion_reason": f"--force-champion (no gate){unscored}"})
    reg = register(checkpoint, args.name, args.tracking_uri, run_id=run_id, experiment=args.experiment,
                   aliases=args.alias, sampler=extra.get("sampler"), guidance=extra.get("guidance"),
                   tags=tags, gate=gate)
    aliases = "".join(f" @{a}" for a in reg.aliases)
    why = f" ({reg.reason})" if reg.reason else ""
    print(f"[flowrail] registered {reg.name} version {reg.version}{aliases}{why} (run {reg.run_id}; {reg.model_uri}; "
          f"sampler {reg.sampler})")
    return 0
