"""``flowrail flux_encode --src SHARDS --out DIR --pipeline FLUX_DIR --size N``: pre-encode image + caption shards
into FLUX latents (16-channel autoencoder, shift/scale applied) + T5 sequence and CLIP pooled text embeddings.

Encoders come from a local diffusers FLUX folder (``vae/``, ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``,
``tokenizer_2/``); each may be overridden by its own folder. Runs on a local Ray or the cluster ``RAY_ADDRESS`` names.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flowrail flux_encode", description=__doc__)
    parser.add_argument("--src", required=True, type=Path, help="a shard set (image.npy/jpg/png + txt or cls)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--pipeline", required=True, type=Path, help="local diffusers FLUX pipeline folder")
    for name in ("vae", "clip", "clip-tokenizer", "t5", "t5-tokenizer"):
        parser.add_argument(f"--{name}", type=Path, default=None, help=f"override the {name} folder")
    parser.add_argument("--size", type=int, required=True, help="square image size in pixels (multiple of 16)")
    parser.add_argument("--t5-max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=1, help="number of encoder actors")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per encoder actor")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per encoder actor")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)

    from pipeline.flux.encode import EncoderPaths, encode_shards
    from pipeline.train.trainer import init_ray

    paths = EncoderPaths.from_pipeline(args.pipeline) if args.pipeline.is_dir() else None
    if paths is None:
        raise FileNotFoundError(f"--pipeline {args.pipeline}: no such folder")
    overrides = {k.replace("-", "_"): str(getattr(args, k.replace("-", "_")))
                 for k in ("vae", "clip", "clip-tokenizer", "t5", "t5-tokenizer") if getattr(args, k.replace("-", "_"))}
    paths = replace(paths, **overrides)
    init_ray()
    manifest = encode_shards(args.src, args.out, paths, size=args.size, t5_max_length=args.t5_max_length,
                             batch_size=args.batch_size, concurrency=args.concurrency, num_cpus=args.num_cpus,
                             num_gpus=args.num_gpus, samples_per_shard=args.samples_per_shard)
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards at {args.out}: latents "
          f"{manifest['shape']}, text {manifest['cond_fields']}")
    return 0
