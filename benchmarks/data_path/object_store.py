"""Object-store data path: samples/s from an S3-compatible server vs local disk, and the driver's start-up.

    python benchmarks/data_path/object_store.py --samples 20000 --repeats 3 --startup-shards 1000

Starts moto's S3 server on 127.0.0.1 (``pip install 'moto[server]'``) and points the standard AWS environment at it
before Ray starts. Then:
  stream      the same flowrail pixel shard set (digits replicated to ``--samples``, 2000 samples per shard) streamed
              with the training worker's reader (``epoch_stream``: tar_reader, preserve_order, uint8 pixels, shuffle
              windows of 512 samples, batches of ``--batch``) from local disk and from s3://; median samples/s over
              ``--repeats`` full passes (local and s3 alternating) after one warm-up pass of each.
  startup     a ``--startup-shards``-shard set (10 samples per shard), local and on s3://: the driver's work before
              training starts — describe (manifest, confinement, existence) plus
                before  verify_shards: every shard's sha256, serially on the driver (what every start used to do)
                first   ensure_verified on a set without a record: the sha256 check in parallel Ray tasks
                cached  ensure_verified with the record of the current manifest: one listing, no reads
All on a local Ray with 2 CPUs; the object store is on the same machine, so "s3" measures the S3 protocol and
client path, not a network.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def start_s3() -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("moto server did not start")


def write_pixels(out: str, n: int, per_shard: int) -> None:
    from pipeline.data.shards import write_shard_set
    from pipeline.data.sources import digits_split

    images, labels = digits_split()["train"]
    write_shard_set(out, ((f"s{i:07d}", {"image.npy": images[i % len(labels)], "cls": int(labels[i % len(labels)])})
                          for i in range(n)), samples_per_shard=per_shard,
                    extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8], "num_classes": 10})


def stream_rates(sets: dict[str, str], batch: int, repeats: int, expected: int) -> dict[str, list[float]]:
    """Samples/s of ``repeats`` full passes over each set, the sets' passes alternating (so that a change in the
    machine's load hits both alike), after one warm-up pass of each."""
    from pipeline.data.streaming import describe, epoch_stream

    described = {where: describe(url, None) for where, url in sets.items()}

    def one_pass(where: str) -> int:  # the training worker's stream: windowed shuffle over 512 samples, full batches
        paths, info = described[where]
        stream, _ = epoch_stream(paths, info, policy="skip", seed=0, epoch=0, rank=0, world=1, batch_size=batch,
                                 shuffle_buffer=512)
        return sum(len(b["label"]) for b, _ in stream)

    expected -= expected % batch  # the incomplete last batch is dropped
    for where in sets:
        assert one_pass(where) == expected
    rates: dict[str, list[float]] = {where: [] for where in sets}
    for _ in range(repeats):
        for where in sets:
            t = time.perf_counter()
            assert one_pass(where) == expected
            rates[where].append(expected / (time.perf_counter() - t))
    return rates


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def startup_times(shards: str) -> dict[str, float]:
    from pipeline.data import storage
    from pipeline.data.shards import manifest_location, verify_shards
    from pipeline.data.streaming import describe
    from pipeline.data.verify import VERIFIED, ensure_verified

    record = storage.join(manifest_location(shards)[0], VERIFIED)

    def drop_record() -> None:
        fs, path = storage.filesystem(record)
        fs.delete_file(path)

    out = {"before": timed(lambda: (describe(shards, None), verify_shards(shards)))}
    drop_record()
    out["first"] = timed(lambda: (describe(shards, None), ensure_verified(shards)))
    out["cached"] = timed(lambda: (describe(shards, None), ensure_verified(shards)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--startup-shards", type=int, default=1000)
    parser.add_argument("--no-startup", action="store_true", help="samples/s only, without the start-up part")
    parser.add_argument("--no-ray", action="store_true",
                        help="start-up only, without Ray (the 'first' verification then runs serially)")
    args = parser.parse_args()
    server = start_s3()
    try:
        import boto3
        import ray

        boto3.client("s3").create_bucket(Bucket="bench")
        if not args.no_ray:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory() as tmp:
            sets = {"local": f"{tmp}/pixels", "s3": "s3://bench/pixels"}
            for where, url in sets.items() if not args.no_ray else ():
                write_pixels(url, args.samples, 2000)
            for where, rates in (stream_rates(sets, args.batch, args.repeats, args.samples).items()
                                 if not args.no_ray else ()):
                print(f"stream {where}: median {statistics.median(rates):,.0f} samples/s, range {min(rates):,.0f}-"
                      f"{max(rates):,.0f} (passes: {', '.join(f'{r:,.0f}' for r in rates)})", flush=True)
            starts = {"local": f"{tmp}/many", "s3": "s3://bench/many"}
            for where, url in starts.items() if not args.no_startup else ():
                t = time.perf_counter()
                write_pixels(url, 10 * args.startup_shards, 10)
                print(f"startup {where}: wrote {args.startup_shards} shards in {time.perf_counter() - t:.1f} s",
                      flush=True)
                times = startup_times(url)
                print(f"startup {where}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()), flush=True)
        if ray.is_initialized():
            ray.shutdown()
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
