"""Training overhead benchmark: a bare PyTorch loop vs flowrail on the same model, batch and number of steps.

    python benchmarks/train_overhead/run.py --steps 300 --repeats 3 --workers 1 2

(a) bare: in-memory digits tensors, the same SiT and objective, torch AdamW (+ DDP over gloo for 2 workers),
    one torch thread per worker process.
(b) flowrail: ``pipeline.train.trainer.fit`` — Ray Data streaming from shards → Ray Train → DeepSpeed ZeRO-2.
Step time = wall time of a 20-step window / 20: for flowrail between consecutive logged windows (MLflow metric
timestamps, so logging, ``ray.train.report`` and data waits count), for bare measured in the loop; the reported
figure is the median window over the run (start-up and checkpoint windows dropped), then the median over repeats.
"data wait" is the worker's logged ``data_wait_fraction`` (median window, median run).
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

WINDOW = 20


def bare_worker(rank: int, world: int, steps: int, overrides: list[str], port: int, out: mp.Queue) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.data.sources import digits_split
    from pipeline.models import build_model
    from pipeline.objective import build_objective
    from pipeline.train.ema import EMA

    torch.set_num_threads(1)
    cfg = load_config(TrainJobConfig, "train", overrides)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y = digits_split()["train"]
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = F.interpolate(x, size=(cfg.data.image_size,) * 2, mode="bilinear", antialias=True).clamp(-1, 1)
    y = torch.from_numpy(y)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, in_channels=1, input_size=cfg.data.image_size, num_classes=10)
    ema = EMA(model, cfg.train.ema_decay)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    objective = build_objective(cfg, 10)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    g = torch.Generator().manual_seed(rank)
    bs = cfg.data.batch_size
    times, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (bs,), generator=g)
        loss = objective.loss(net, {"image": x[idx], "label": y[idx]})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        ema.update(model, ema.decay_at(step))
        if step % WINDOW == 0:
            loss.item()
            times.append((time.perf_counter() - t0) / WINDOW)
            t0 = time.perf_counter()
    if rank == 0:
        out.put(statistics.median(times[1:]))
    if world > 1:
        dist.destroy_process_group()


def bare(world: int, steps: int, overrides: list[str]) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29600 + int(time.time()) % 200
    procs = [ctx.Process(target=bare_worker, args=(r, world, steps, overrides, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    result = q.get(timeout=3600)
    for p in procs:
        p.join()
    return result


def flowrail(world: int, steps: int, overrides: list[str], run_dir: Path, name: str) -> tuple[float, float]:
    """Median step time (s) and median data-wait fraction of one flowrail run.

    Step time = wall time between consecutive logged windows / log_every, from the MLflow metric timestamps (taken
    when rank 0 logs), so everything the loop does between windows counts, logging and ``ray.train.report`` too.
    """
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.train.trainer import fit

    cfg = load_config(TrainJobConfig, "train", overrides + [
        f"run_dir={run_dir}", f"run_name={name}", f"train.num_workers={world}", f"train.log_every={WINDOW}",
        f"train.checkpoint_every={steps}"])
    result = fit(cfg, make_grid=False)
    c = MlflowClient(result.tracking_uri)
    hist = sorted((m.step, m.timestamp) for m in c.get_metric_history(result.run_id, "samples_per_s"))
    wait = sorted((m.step, m.value) for m in c.get_metric_history(result.run_id, "data_wait_fraction"))
    # windows between consecutive logs; drop the first (start-up) and the last (it includes the checkpoint)
    times = [(t1 - t0) / 1e3 / (s1 - s0) for (s0, t0), (s1, t1) in itertools.pairwise(hist)][1:-1]
    return statistics.median(times), statistics.median(v for _, v in wait[1:-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=20000, help="digits replicated to this many samples, so an "
                        "epoch (a new Ray Data execution per worker) is longer than the run, as on real data")
    parser.add_argument("--flowrail-overrides", nargs="*", default=[],
                        help="extra flowrail config overrides (e.g. train.zero_stage=0), for experiments")
    parser.add_argument("--ray-minimal", action="store_true",
                        help="experiment: ray.init(include_dashboard=False, log_to_driver=False); in Ray 2.60 that "
                        "drops the dashboard's UI modules (its head process still runs) and the streaming of worker "
                        "logs to the driver (flowrail's default keeps both)")
    args = parser.parse_args()
    from pipeline.data.shards import write_shard_set
    from pipeline.data.sources import digits_split
    from pipeline.train.trainer import init_ray

    if args.ray_minimal:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    else:
        init_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, labels = digits_split()["train"]
        write_shard_set(root / "digits", ((f"s{i:07d}", {"image.npy": images[i % len(labels)],
                                                         "cls": int(labels[i % len(labels)])})
                                          for i in range(args.samples)), samples_per_shard=2000,
                        extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8], "num_classes": 10})
        overrides = [f"data.shards={root / 'digits'}", "data.val_shards=null", "data.image_size=16", "data.batch_size=64",
                     f"train.steps={args.steps}", "train.cpus_per_worker=0.5"]
        print("| workers | bare PyTorch step (ms) | flowrail step (ms) | ratio flowrail/bare | flowrail data wait |")
        print("|---|---:|---:|---:|---:|")
        for world in args.workers:
            a = statistics.median(bare(world, args.steps, overrides) for _ in range(args.repeats))
            runs = [flowrail(world, args.steps, overrides + args.flowrail_overrides, root / "runs", f"w{world}r{i}")
                    for i in range(args.repeats)]
            b = statistics.median(r[0] for r in runs)
            wait = statistics.median(r[1] for r in runs)
            print(f"| {world} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.3f} | {wait:.1%} |", flush=True)

if __name__ == "__main__":
    main()
