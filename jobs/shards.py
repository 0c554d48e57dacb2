"""``flowrail shards digits --out DIR`` | ``flowrail shards images SRC --out DIR [--size N]``.

DIR is a local directory or an object-store URL (``s3://bucket/prefix``, ``gs://...``; credentials from the
standard environment, see pipeline/data/storage.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.data.sources import write_digits, write_image_folder


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flowrail shards", description=__doc__)
    sub = parser.add_subparsers(dest="source", required=True)
    digits = sub.add_parser("digits", help="scikit-learn's bundled 8x8 digits (train/val split)")
    digits.add_argument("--out", required=True, help="local directory or s3:// / gs:// URL")
    digits.add_argument("--samples-per-shard", type=int, default=256)
    images = sub.add_parser("images", help="an image folder with one sub-folder per class")
    images.add_argument("src", type=Path)
    images.add_argument("--out", required=True, help="local directory or s3:// / gs:// URL")
    images.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE")
    images.add_argument("--channels", type=int, choices=(1, 3), default=3)
    images.add_argument("--val-fraction", type=float, default=0.0)
    images.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.source == "digits":
        manifests = write_digits(args.out, samples_per_shard=args.samples_per_shard)
    else:
        manifests = write_image_folder(args.src, args.out, size=args.size, channels=args.channels,
                                       val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard)
    for split, m in manifests.items():
        print(f"{split}: {m['num_samples']} samples in {len(m['shards'])} shards, shape {m['shape']}, "
              f"{m['num_classes']} classes")
    return 0
