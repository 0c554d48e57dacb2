"""``flowrail encode --vae DIR --src SHARDS --out DIR``: pre-encode pixel shards into autoencoder latent shards.

SRC is a shard set or a folder of shard sets (e.g. ``train/`` and ``val/``); each becomes the same name under OUT.
SRC and OUT are local directories or URLs of an object store (``s3://bucket/prefix``, ``gs://...``; credentials
from the standard environment, see pipeline/data/storage.py); the autoencoder folder is local.
Train on the result with ``flowrail train data.shards=OUT/train data.val_shards=OUT/val``.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flowrail encode", description=__doc__)
    parser.add_argument("--vae", required=True, type=Path, help="local diffusers AutoencoderKL folder")
    parser.add_argument("--src", required=True,
                        help="pixel shard set, or a folder of shard sets: local directory or s3:// / gs:// URL")
    parser.add_argument("--out", required=True, help="local directory or s3:// / gs:// URL")
    parser.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE before encoding")
    parser.add_argument("--scale", type=float, default=None,
                        help="latent scale (default: the autoencoder's scaling_factor, 0.18215 for SD)")
    parser.add_argument("--posterior", choices=("mean", "sample"), default="mean")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=1, help="encoder actors")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    for name in ("batch_size", "concurrency", "samples_per_shard"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")

    from pipeline.data.encode import encode_tree
    from pipeline.train.trainer import init_ray

    init_ray()
    manifests = encode_tree(args.src, args.out, args.vae, size=args.size, scale=args.scale, posterior=args.posterior,
                            batch_size=args.batch_size, concurrency=args.concurrency, num_cpus=args.cpus_per_actor,
                            num_gpus=args.gpus_per_actor, samples_per_shard=args.samples_per_shard)
    for name, m in manifests.items():
        print(f"{name}: {m['num_samples']} latents {m['shape']} in {len(m['shards'])} shards, "
              f"latent_scale {m['latent_scale']}")
    return 0
