"""CPU used by a worker's Ray Data stream while training runs (the reason ``executor_idle.py`` existed, now removed).

    python benchmarks/data_path/idle_executor.py --samples 20000 --repeats 3

A process consumes one rank's epoch stream exactly as a training worker does (``epoch_stream``: tar_reader,
preserve_order, windowed shuffle, the read budget of 2 workers x 0.5 CPU on a 2-CPU local Ray), but stands in for
the training step by sleeping ``--step-s`` after each batch: the step itself uses no CPU, so the process's CPU time
over the pass is what the stream costs (its executor thread, block fetching, batching). Reported: process CPU
seconds per wall second over the pass (``time.process_time``, all threads), ``--repeats`` passes; median and range.
The comparison with the removed ``IdleExecutorThrottle`` (RESULTS.md) was run by this script at commit f58f8fb.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def one_pass(shards: str, batch: int, step_s: float) -> tuple[float, int]:
    """(process CPU s per wall s, batches) over one epoch of a slow consumer."""
    import ray

    from pipeline.data.read_budget import read_budget
    from pipeline.data.streaming import describe, epoch_stream

    paths, info = describe(shards, None)
    budget = read_budget(ray.cluster_resources(), num_workers=2, cpus_per_worker=0.5)
    stream, _ = epoch_stream(paths, info, policy="skip", seed=0, epoch=0, rank=0, world=1, batch_size=batch,
                             shuffle_buffer=512, budget=budget)
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for _ in stream:
        n += 1
        time.sleep(step_s)
    return (time.process_time() - cpu) / (time.perf_counter() - wall), n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--step-s", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import ray

    from benchmarks.data_path.object_store import write_pixels

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        write_pixels(f"{tmp}/pixels", args.samples, args.per_shard)
        one_pass(f"{tmp}/pixels", args.batch, 0.0)  # warm-up: Ray Data's workers started, files cached
        values = []
        for _ in range(args.repeats):
            share, n = one_pass(f"{tmp}/pixels", args.batch, args.step_s)
            values.append(share)
            print(f"pass: {share:.3f} CPU-s per s over {n} batches", flush=True)
        print(f"median {statistics.median(values):.3f} CPU-s/s (range {min(values):.3f}-{max(values):.3f}, "
              f"{len(values)} passes)", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
