"""``flowrail privacy <mark|release|train|audit> ...``: the privacy stage (privacy/ holds the algorithms).

  privacy mark DIR                                   declare a shard set sensitive
  privacy release --sensitive DIR --out DIR --noise-std S [--clean-from DIR | --clean-fraction F]
                  [--secret-seed-file PATH]          noisy copies + clean subset (secret also via $FLOWRAIL_PRIVACY_SECRET)
  privacy train [--config PATH] key=value ...        SFBD / SFBD flow / baselines (privacy.method=...)
  privacy audit CHECKPOINT --sensitive DIR [--release DIR] [--num-samples N]
"""
from __future__ import annotations

import argparse
import json


def _mark(argv: list[str]) -> int:
    from privacy.boundary import mark_sensitive

    p = argparse.ArgumentParser(prog="flowrail privacy mark", description="declare a shard set sensitive")
    p.add_argument("dir")
    args = p.parse_args(argv)
    path = mark_sensitive(args.dir)
    print(f"[flowrail privacy] {args.dir} is now sensitive ({path}); only `flowrail privacy release` reads it")
    return 0


def _release(argv: list[str]) -> int:
    from privacy.release import read_secret, release

    p = argparse.ArgumentParser(prog="flowrail privacy release", description="write the noisy release")
    p.add_argument("--sensitive", required=True, help="the sensitive shard set (marked with `privacy mark`)")
    p.add_argument("--out", required=True, help="output directory (noisy/, clean/, release.json)")
    p.add_argument("--noise-std", type=float, required=True, help="s in y = x + s eps, pixel scale [-1, 1]")
    clean = p.add_mutually_exclusive_group()
    clean.add_argument("--clean-from", help="a separate public/consented shard set to copy as the clean subset")
    clean.add_argument("--clean-fraction", type=float, help="declare this fraction of the sensitive set consented")
    p.add_argument("--clean-seed", type=int, default=0, help="which samples --clean-fraction picks (not secret)")
    p.add_argument("--secret-seed-file", help="file holding the secret noise seed (else $FLOWRAIL_PRIVACY_SECRET)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--samples-per-shard", type=int, default=1000)
    args = p.parse_args(argv)
    result = release(args.sensitive, args.out, args.noise_std, read_secret(args.secret_seed_file),
                     clean_from=args.clean_from, clean_fraction=args.clean_fraction, clean_seed=args.clean_seed,
                     dtype=args.dtype, samples_per_shard=args.samples_per_shard)
    counts = result.manifest["counts"]
    print(f"[flowrail privacy] released {counts['noisy']} noisy copies (s={args.noise_std}) and {counts['clean']} "
          f"clean samples into {result.out_dir}")
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
    from privacy.audit_run import audit_checkpoint

    p = argparse.ArgumentParser(prog="flowrail privacy audit", description="memorization audit of a checkpoint")
    p.add_argument("checkpoint", help="a flowrail checkpoint or run directory")
    p.add_argument("--sensitive", required=True, help="the sensitive shard set the model's data came from")
    p.add_argument("--release", help="also audit the reconstructions of this release's noisy copies")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", default="auto", choices=["auto", "digits_classifier", "pixels"])
    args = p.parse_args(argv)
    out = audit_checkpoint(args.checkpoint, args.sensitive, release=args.release, num_samples=args.num_samples,
                           seed=args.seed, features=args.features)
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


SUBCOMMANDS = {"mark": _mark, "release": _release, "train": _train, "audit": _audit}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if argv[0] not in SUBCOMMANDS:
        raise ValueError(f"unknown privacy command '{argv[0]}' (allowed: {', '.join(SUBCOMMANDS)})")
    return SUBCOMMANDS[argv[0]](argv[1:])
