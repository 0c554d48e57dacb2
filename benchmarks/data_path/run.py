"""Data path benchmark: samples/s of flowrail's Ray Data stream vs webdataset's own loader, same shards.

    python benchmarks/data_path/run.py --samples 20000 --repeats 3

Writes pixel shards (digits replicated to ``--samples``, uint8 8x8) and latent shards (float32 4x8x8) to a
temporary directory, then measures, per shard set, the steady-state samples/s of
  raw      webdataset.WebDataset(...).decode() → numpy batches normalised to float32 (single process)
  flowrail pipeline.data.streaming.build_dataset(...).iter_torch_batches (local Ray, 2 CPUs)
Each figure is the median over ``--repeats`` full passes after one warm-up pass.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_sets(root: Path, n: int) -> dict[str, Path]:
    from pipeline.data.shards import write_shard_set
    from pipeline.data.sources import digits_split

    images, labels = digits_split()["train"]
    reps = int(np.ceil(n / len(labels)))
    images, labels = np.concatenate([images] * reps)[:n], np.concatenate([labels] * reps)[:n]
    pix = write_shard_set(root / "pixels", ((f"s{i:07d}", {"image.npy": images[i], "cls": int(labels[i])})
                                            for i in range(n)), samples_per_shard=2000,
                          extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8], "num_classes": 10})
    rng = np.random.default_rng(0)
    lat = write_shard_set(root / "latents", ((f"s{i:07d}", {"latent.npy": rng.standard_normal((4, 8, 8), np.float32),
                                                            "cls": int(labels[i])}) for i in range(n)),
                          samples_per_shard=2000,
                          extra={"kind": "latents", "field": "latent.npy", "shape": [4, 8, 8], "num_classes": 10})
    assert pix["num_samples"] == lat["num_samples"] == n
    return {"pixels": root / "pixels", "latents": root / "latents"}


def raw_pass(shard_dir: Path, field: str, batch: int) -> int:
    import webdataset as wds

    from pipeline.data.shards import read_manifest, shard_paths

    urls = shard_paths(shard_dir, read_manifest(shard_dir))
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode().to_tuple(field, "cls").batched(batch)
    n = 0
    for x, y in ds:
        x = np.asarray(x)
        x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
        n += len(y)
    return n


def flowrail_pass(ds, batch: int) -> int:
    n = 0
    for b in ds.iter_torch_batches(batch_size=batch):
        n += len(b["label"])
    return n


def measure(fn, repeats: int) -> tuple[float, int]:
    fn()  # warm-up
    rates, n = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates), n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import ray

    from pipeline.data.streaming import build_dataset

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = write_sets(Path(tmp), args.samples)
        for kind, path in sets.items():
            field = "image.npy" if kind == "pixels" else "latent.npy"
            raw, n_raw = measure(lambda: raw_pass(path, field, args.batch), args.repeats)
            ds, _ = build_dataset(str(path), image_size=None, shuffle_files=False)
            ours, n_ours = measure(lambda: flowrail_pass(ds, args.batch), args.repeats)
            assert n_raw == n_ours == args.samples, (n_raw, n_ours)
            rows.append((kind, raw, ours, ours / raw))
    print("| shards | webdataset loader (samples/s) | flowrail Ray Data (samples/s) | ratio |")
    print("|---|---|---|---|")
    for kind, raw, ours, ratio in rows:
        print(f"| {kind} | {raw:,.0f} | {ours:,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
