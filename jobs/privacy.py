"""``flowrail privacy <mark|release|train|audit> ...``: the privacy stage (privacy/ holds the algorithms).

  privacy mark DIR|URL_PREFIX                        declare a shard set sensitive (a URL prefix: fence registry)
  privacy release --sensitive DIR --out DIR --noise-std S [--clean-from DIR | --consent-list FILE]
                  [--secret-file PATH] [--derive-from RELEASE] [--release-labels] [--allow-large-clean-fraction]
                                                     noisy copies + clean subset (see docs/PRIVACY.md)
  privacy train [--config PATH] key=value ...        SFBD / SFBD flow / baselines (privacy.method=...)
  privacy audit CHECKPOINT --sensitive DIR [--release DIR] [--num-samples N]
                                                     memorization audit; a pass unlocks sample grids and `register`
  privacy resolve RELEASE_ID                         a release reserved in the ledger but never committed (a killed
                                                     release): count it as released at its level, unblocking releases
"""
from __future__ import annotations

import argparse
import json


def _mark(argv: list[str]) -> int:
    from privacy.boundary import mark_sensitive

    p = argparse.ArgumentParser(prog="flowrail privacy mark", description="declare a shard set sensitive")
    p.add_argument("dir", help="a shard directory, or a URL prefix to add to the fence registry")
    args = p.parse_args(argv)
    path = mark_sensitive(args.dir)
    print(f"[flowrail privacy] {args.dir} is now sensitive ({path}); only the privacy stage reads it")
    return 0


def _release(argv: list[str]) -> int:
    from privacy.release import DEFAULT_MAX_CLEAN_FRACTION, release

    p = argparse.ArgumentParser(prog="flowrail privacy release", description="write the noisy release")
    p.add_argument("--sensitive", required=True, help="the sensitive shard set (marked with `privacy mark`)")
    p.add_argument("--out", required=True, help="output directory (noisy/, clean/, release.json)")
    p.add_argument("--noise-std", type=float, required=True, help="s in y = x + s eps, pixel scale [-1, 1]")
    clean = p.add_mutually_exclusive_group()
    clean.add_argument("--clean-from", help="a separate public shard set to copy as the clean subset")
    clean.add_argument("--consent-list", help="the data owner's file inside the sensitive set's fence naming each "
                                              "consented key (one per line): released in the clear (its sha256 is "
                                              "recorded)")
    p.add_argument("--allow-large-clean-fraction", action="store_true",
                   help=f"allow a consent list above {DEFAULT_MAX_CLEAN_FRACTION * 100:.0f}%% of the set (recorded)")
    p.add_argument("--derive-from", help="an earlier release of this set that the ledger knows (its files are "
                                         "verified against the recorded hashes): derive this one at a higher level")
    p.add_argument("--release-labels", action="store_true", help="declare the labels non-sensitive and release them")
    p.add_argument("--secret-file", help="a secret of >= 128 random bits (hex or raw) that passes the entropy "
                                         "check; default: a 256-bit secret generated inside the sensitive set's fence")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--samples-per-shard", type=int, default=1000)
    args = p.parse_args(argv)
    result = release(args.sensitive, args.out, args.noise_std, secret_file=args.secret_file,
                     clean_from=args.clean_from, consent_list=args.consent_list,
                     allow_large_clean_fraction=args.allow_large_clean_fraction, derive_from=args.derive_from,
                     release_labels=args.release_labels, dtype=args.dtype, samples_per_shard=args.samples_per_shard)
    counts = result.manifest["counts"]
    made = "generated a new 256-bit secret inside the fence; " if result.secret_created else ""
    print(f"[flowrail privacy] {made}released {counts['noisy']} noisy copies (s={args.noise_std}) and "
          f"{counts['clean']} clean samples into {result.out_dir}")
    return 0


def _train(argv: list[str]) -> int:
    from pipeline.config import load_config
    from privacy.config import PrivacyTrainConfig
    from privacy.train import fit_privacy

    p = argparse.ArgumentParser(prog="flowrail privacy train", description="train SFBD / SFBD flow / baselines")
    p.add_argument("--config", default=None, help="a YAML path (defaults: privacy/config.py)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. privacy.method=sfbd")
    args = p.parse_args(argv)
    cfg = load_config(PrivacyTrainConfig, args.config, args.overrides)
    result = fit_privacy(cfg)
    print(f"[flowrail privacy] done: MLflow run {result.run_id}; checkpoint {result.checkpoint}")
    return 0


def _audit(argv: list[str]) -> int:
    from privacy.audit_run import MAX_EXTRACTION_RATE, MIN_SAMPLES, NN_FLOOR_FACTOR, audit_checkpoint
    from privacy.gate import LOOSENED, is_loosened, log_sample_grid

    p = argparse.ArgumentParser(prog="flowrail privacy audit", description="memorization audit of a checkpoint")
    p.add_argument("checkpoint", help="a flowrail checkpoint or run directory")
    p.add_argument("--sensitive", required=True, help="the sensitive shard set the model's data came from")
    p.add_argument("--release", help="the release the model trained on (default: the checkpoint's privacy.release)")
    p.add_argument("--num-samples", type=int, default=500, help=f">= {MIN_SAMPLES} for a pass (0/N bounds < 1%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", default="auto", choices=["auto", "digits_classifier", "pixels"])
    p.add_argument("--denoise-steps", type=int, default=40)
    p.add_argument("--max-extraction-rate", type=float, default=MAX_EXTRACTION_RATE)
    p.add_argument("--nn-floor-factor", type=float, default=NN_FLOOR_FACTOR)
    args = p.parse_args(argv)
    release = args.release or _release_of(args.checkpoint)
    out = audit_checkpoint(args.checkpoint, args.sensitive, release=release, num_samples=args.num_samples,
                           seed=args.seed, features=args.features, denoise_steps=args.denoise_steps,
                           max_rate=args.max_extraction_rate, nn_factor=args.nn_floor_factor)
    print(json.dumps(out, indent=2, sort_keys=True))  # aggregates only (privacy.audit_run drops per-sample minima)
    if out["passed"] and is_loosened(out["criterion"]):
        print(f"[flowrail privacy] audit {LOOSENED} (recorded); `flowrail register` needs --accept-loosened-audit")
        return 0
    if out["passed"]:
        grid = log_sample_grid(args.checkpoint)
        print(f"[flowrail privacy] audit passed; sample grid logged ({grid})")
        return 0
    print(f"[flowrail privacy] audit FAILED: {'; '.join(out['fail_reasons'])}")
    return 1


def _resolve(argv: list[str]) -> int:
    from privacy.ledger import home, resolve

    p = argparse.ArgumentParser(prog="flowrail privacy resolve",
                                description="count a reserved, never committed release as released at its level")
    p.add_argument("release_id", help="the id the refusal named")
    args = p.parse_args(argv)
    record = resolve(args.release_id)
    print(f"[flowrail privacy] release {args.release_id} (s={record['noise_std']:g}, {record['out']}) now counts as "
          f"released in {home()}; it cannot be derived from")
    return 0


def _release_of(checkpoint: str) -> str | None:
    from pipeline.train.checkpoint import find_latest, read_meta

    return read_meta(find_latest(checkpoint)).get("privacy", {}).get("release")


SUBCOMMANDS = {"mark": _mark, "release": _release, "train": _train, "audit": _audit, "resolve": _resolve}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if argv[0] not in SUBCOMMANDS:
        raise ValueError(f"unknown privacy command '{argv[0]}' (allowed: {', '.join(SUBCOMMANDS)})")
    return SUBCOMMANDS[argv[0]](argv[1:])
