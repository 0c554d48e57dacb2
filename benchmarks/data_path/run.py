"""Data path benchmark: samples/s of flowrail's Ray Data stream vs webdataset's own loader, same shards.

    python benchmarks/data_path/run.py --samples 20000 --repeats 3

Writes pixel shards (digits replicated to ``--samples``, uint8 8x8x1) and latent shards (float32 4x8x8) to a
temporary directory (2000 samples per shard), then measures, per shard set, the steady-state samples/s of
  raw         webdataset.WebDataset(...).decode() → numpy batches normalised to float32 (single process)
  wds-read    ray.data.read_webdataset(..., decoder=safe_decode).iter_batches (numpy, no torch): the upstream reader
  wds+Decode  read_webdataset(decoder=refuse_unsafe) → flowrail's Decode → iter_torch_batches: the stream used for shard sets
              not in flowrail format (and for all sets before tar_reader)
  tar_reader  pipeline.data.tar_reader.read_shards → iter_torch_batches (flowrail-format shards parsed in memory)
  tar+shuffle tar_reader with the training worker's options: preserve_order and a 512-sample local shuffle buffer
All Ray figures on a local Ray with 2 CPUs. Each figure is the median over ``--repeats`` full passes after one
warm-up pass; every pass must deliver all samples.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
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


def torch_pass(make_ds: Callable[[], object], batch: int, shuffle_buffer: int | None = None) -> int:
    n = 0
    for b in make_ds().iter_torch_batches(batch_size=batch, local_shuffle_buffer_size=shuffle_buffer):
        n += len(b["label"])
    return n


def numpy_pass(make_ds: Callable[[], object], batch: int) -> int:
    n = 0
    for b in make_ds().iter_batches(batch_size=batch, batch_format="numpy"):
        n += len(b["__key__"])
    return n


def measure(fn: Callable[[], int], repeats: int, expected: int) -> float:
    assert fn() == expected  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
        assert n == expected, (n, expected)
    return statistics.median(rates)


def webdataset_decode(files: list[str], info: object) -> object:
    """flowrail's generic stream (any WebDataset tars): read_webdataset (members as bytes) → Decode."""
    import ray

    from pipeline.data.streaming import Decode

    from pipeline.data.safe_decode import refuse_unsafe

    ds = ray.data.read_webdataset(files, shuffle=None, decoder=refuse_unsafe)
    return ds.map_batches(Decode(info, "skip"), batch_format="numpy", batch_size=256, zero_copy_batch=True)


def cases(kind: str, path: Path, batch: int) -> dict[str, Callable[[], int]]:
    """The measured passes over one shard set."""
    import ray

    from pipeline.data.shards import read_manifest, shard_paths
    from pipeline.data.streaming import describe
    from pipeline.data.safe_decode import safe_decode
    from pipeline.data.tar_reader import read_shards

    field = "image.npy" if kind == "pixels" else "latent.npy"
    paths, info = describe(str(path), None)
    files = shard_paths(path, read_manifest(path))
    ctx = ray.data.DataContext.get_current()

    def worker_like() -> int:  # the training worker's options: ordered blocks, 512-sample local shuffle
        ctx.execution_options.preserve_order = True
        try:
            return torch_pass(lambda: read_shards(paths, info), batch, 512)
        finally:
            ctx.execution_options.preserve_order = False

    return {
        "raw": lambda: raw_pass(path, field, batch),
        "wds-read": lambda: numpy_pass(lambda: ray.data.read_webdataset(files, decoder=safe_decode), batch),
        "wds+Decode": lambda: torch_pass(lambda: webdataset_decode(files, info), batch),
        "tar_reader": lambda: torch_pass(lambda: read_shards(paths, info), batch),
        "tar+shuffle": worker_like,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="subset of: raw wds-read wds+Decode tar_reader "
                                                                "tar+shuffle")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        sets = write_sets(Path(tmp), args.samples)
        results: dict[str, dict[str, float]] = {}
        for kind, path in sets.items():
            results[kind] = {}
            for name, fn in cases(kind, path, args.batch).items():
                if args.only and name not in args.only:
                    continue
                results[kind][name] = measure(fn, args.repeats, args.samples)
                print(f"{kind} {name}: {results[kind][name]:,.0f} samples/s", flush=True)
    names = [n for n in ["raw", "wds-read", "wds+Decode", "tar_reader", "tar+shuffle"]
             if any(n in r for r in results.values())]
    print("\n| shards | " + " | ".join(f"{n} (samples/s)" for n in names) + " | " +
          " | ".join(f"{n} / raw" for n in names if n != "raw") + " |")
    print("|---|" + "---:|" * (2 * len(names) - 1))
    for kind, r in results.items():
        raw = r.get("raw", float("nan"))
        print(f"| {kind} | " + " | ".join(f"{r[n]:,.0f}" if n in r else "-" for n in names) + " | " +
              " | ".join(f"{r[n] / raw:.2f}" if n in r else "-" for n in names if n != "raw") + " |")


if __name__ == "__main__":
    main()
