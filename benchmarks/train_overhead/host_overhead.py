"""Host overhead of the training loop itself: a near-free model through a bare loop and through flowrail's worker.

    python benchmarks/train_overhead/host_overhead.py --repeats 3 --seed 1 [--flowrail-overrides train.engine=torch]

By default a steady state over several epochs: 1,500 steps on a shard set of 256 batches per epoch, measured from
step 300 on (the first epoch's one-off start-up, Ray spawning the read tasks' worker processes, left out), so the
window holds about five epoch boundaries, each with the next epoch's stream started in the background as in
training. ``--epoch-batches 0``: one epoch longer than the run (the measurement of sessions 7-10).

The model is one ``Linear(C*H*W, C*H*W)`` on the flattened input (8x8x1 digits: 64x64 weights, 4160 parameters),
so a step's time is what the loop around the model costs. Both loops use the same transport objective (linear path,
velocity loss), batch 64, one torch thread, gradient clipping, AdamW and an EMA update every step.

(a) bare      in-memory tensors, ``objective.loss -> zero_grad -> backward -> clip -> AdamW.step -> EMA``, run
              inside the same Ray worker just before and just after flowrail's loop (the mean of the two), so both
              see the same CPU share of this shared machine.
(b) flowrail  ``pipeline.train.trainer.fit`` with 1 worker: Ray Data stream from WebDataset shards, Ray Train,
              the DeepSpeed engine, EMA, NaN guard, MLflow logging every ``--log-every`` steps, ``ray.train.report``.
              It runs flowrail's real worker loop (``pipeline.train.worker.train_loop_per_worker``); only the model
              it builds is replaced, inside the Ray worker, by the near-free one (``near_free_worker_loop``), so no
              model family or config value exists for it.

Step time: the mean time per step between step ``--warmup`` and the step before the last (the final checkpoint is
left out; the logging and ``ray.train.report`` of every window are in), in microseconds; median over repeats, with
min-max. Parts: cumulative timers around the loop's parts over the same steps (wrapped methods, no profiler), per
step; "rest" is what no timer covers (the worker loop's own Python, batch bookkeeping). Also printed for each
repeat: the CPU time per step of each thread of the worker (``/proc/self/task``) and of every process on the machine
(``/proc/<pid>/stat``), which tell the loop's own CPU cost from the time it waits for a core or the GIL.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGE = (1, 8, 8)


class NearFreeModel(nn.Module):
    """``v(x, t, y) = W flatten(x) + b``: the cheapest network the transport objective can train."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x.flatten(1)).view_as(x)


class PartTimer:
    """Cumulative wall time per named part, counted on the thread that made the timer (the training loop's; calls
    on background threads, e.g. the next epoch's prefetch, cost the loop nothing directly); :meth:`mark` snapshots
    the totals at a step."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.marks: dict[str, tuple[float, dict[str, float]]] = {}
        self.thread = threading.get_ident()
        self.native_thread = threading.get_native_id()
        self.cpu_marks: dict[str, dict[str, float]] = {}
        self.proc_marks: dict[str, dict[str, tuple[str, float]]] = {}

    def _add(self, name: str, t0: float) -> None:
        if threading.get_ident() == self.thread:
            self.total[name] += time.perf_counter() - t0

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(name, t)
        return timed

    def wrap_iter(self, name: str, it: Iterator[Any]) -> Iterator[Any]:
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self._add(name, t)
                return
            self._add(name, t)
            yield item

    def mark(self, key: str) -> None:
        self.marks[key] = (time.perf_counter(), dict(self.total))

    def mark_cpu(self, key: str) -> None:
        """Snapshot every thread's and every process's CPU time (a /proc scan of a few ms: taken outside the timed
        window, before its start mark and after its end mark)."""
        self.cpu_marks[key] = thread_cpu_seconds(self.native_thread)
        self.proc_marks[key] = process_cpu_seconds()

    def cpu_per_step(self, start: str, end: str, steps: int) -> dict[str, float]:
        """CPU microseconds per step of each thread of this process between two marks, by thread name."""
        a, b = self.cpu_marks[start], self.cpu_marks[end]
        return {k: (v - a.get(k, 0.0)) / steps * 1e6 for k, v in b.items() if v - a.get(k, 0.0) > 0}

    def process_cpu_per_step(self, start: str, end: str, steps: int) -> dict[str, float]:
        """CPU microseconds per step of the machine's processes between two marks, summed by the name each has at
        the end; processes started in between under ``(started in the window)``: their whole CPU time."""
        a, b = self.proc_marks[start], self.proc_marks[end]
        out: dict[str, float] = defaultdict(float)
        for pid, (name, cpu) in b.items():
            out[name if pid in a else "(started in the window)"] += (cpu - a[pid][1] if pid in a else cpu)
        return {k: v / steps * 1e6 for k, v in out.items() if v > 0}

    def per_step(self, start: str, end: str, steps: int) -> dict[str, float]:
        """Microseconds per step of each part and of the whole interval (``step``), ``rest`` = step - parts."""
        (t0, a), (t1, b) = self.marks[start], self.marks[end]
        parts = {k: (b.get(k, 0.0) - a.get(k, 0.0)) / steps * 1e6 for k in b}
        step = (t1 - t0) / steps * 1e6
        return {"step": step, **parts, "rest": step - sum(parts.values())}


CPU_KEY = "thread CPU"  # the bare loop's own thread's CPU time per step (not a part of its step time)


def _stat_cpu_seconds(stat: str, tick: int) -> tuple[str, float]:
    """(command name, user + system CPU seconds) from the text of a ``/proc/.../stat`` file."""
    head, tail = stat.rsplit(")", 1)
    fields = tail.split()
    return head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / tick


def thread_cpu_seconds(loop_thread: int | None = None) -> dict[str, float]:
    """User + system CPU seconds of each thread of this process (``/proc/self/task``), keyed by the Python thread's
    name where Python started it (``loop`` for the training loop's, native id ``loop_thread``), else the OS name,
    summed over equal names."""
    import os

    names = {t.native_id: t.name for t in threading.enumerate()}
    names[threading.main_thread().native_id] = "main"
    if loop_thread is not None:
        names[loop_thread] = "loop"
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = defaultdict(float)
    for tid in os.listdir("/proc/self/task"):
        try:
            comm, cpu = _stat_cpu_seconds(Path(f"/proc/self/task/{tid}/stat").read_text(), tick)
        except OSError:
            continue
        name = re.sub(r"[_-]?\d+$", "", names.get(int(tid), comm))  # ThreadPoolExecutor-0_1 -> ThreadPoolExecutor-0
        out[name] += cpu
    return dict(out)


def process_cpu_seconds() -> dict[str, tuple[str, float]]:
    """pid -> (command, user + system CPU seconds) of every process on the machine (``/proc/<pid>/stat``); this
    process is ``this worker``, a Ray worker is named by the task it runs at the time of reading."""
    import os

    tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    out: dict[str, tuple[str, float]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm, cpu = _stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), tick)
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        out[pid] = ("this worker" if int(pid) == me else (cmd.rsplit("/", 1)[-1] or comm)[:40], cpu)
    return out


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.data.sources import digits_split

    x, y = digits_split()["train"]
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1, torch.from_numpy(y)


def bare(steps: int, warmup: int, overrides: list[str], seed: int) -> dict[str, float]:
    """The bare loop in this process, one torch thread; parts per step in microseconds."""
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.objective import build_objective
    from pipeline.train.ema import EMA

    torch.set_num_threads(1)
    cfg = load_config(TrainJobConfig, "train", overrides)
    x, y = digits_tensors()
    torch.manual_seed(seed)
    model = NearFreeModel(x[0].numel())
    ema = EMA(model, cfg.train.ema_decay)
    objective = build_objective(cfg, 10)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    g = torch.Generator().manual_seed(seed)
    bs, timer = cfg.data.batch_size, PartTimer()
    batch = timer.wrap("batch", lambda: (idx := torch.randint(0, len(y), (bs,), generator=g),
                                         {"image": x[idx], "label": y[idx]})[1])
    loss_fn, ema_update = timer.wrap("loss", objective.loss), timer.wrap("ema", ema.update)

    def backward(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def opt_step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
    backward, opt_step = timer.wrap("backward", backward), timer.wrap("optimizer", opt_step)
    for step in range(1, steps + 1):
        if step == warmup:
            timer.mark("start")
            cpu0 = time.thread_time()
        loss = loss_fn(model, batch())
        backward(loss)
        opt_step()
        ema_update(model, ema.decay_at(step))
    cpu = (time.thread_time() - cpu0) / (steps - warmup + 1) * 1e6
    timer.mark("end")
    loss.item()
    return {**timer.per_step("start", "end", steps - warmup + 1), CPU_KEY: cpu}


def near_free_worker_loop(out_file: str, warmup: int, steps: int) -> Callable[[dict[str, Any]], None]:
    """flowrail's own ``train_loop_per_worker`` with the near-free model and part timers installed in the worker.

    The model is swapped where the worker builds it (``worker_setup.build_worker_model``); the parts are timed by
    wrapping the engine's ``backward``/``step``, the objective's ``loss``, the EMA's ``update``, the step-flag
    agreement, the batch stream's ``next`` and ``ray.train.report``/metric recording. Rank 0 writes the result.
    """

    def loop(loop_config: dict[str, Any]) -> None:
        import ray.train

        import pipeline.data.streaming as streaming
        import pipeline.tracking as tracking
        from pipeline.train import loop as train_loop
        from pipeline.train import worker, worker_setup

        timer = PartTimer()
        build_setup = worker_setup.set_up_worker

        def near_free_model(cfg: Any, info: Any, **_: Any) -> nn.Module:
            torch.manual_seed(cfg.seed)
            return NearFreeModel(info.channels * info.size * info.size)

        def set_up(*args: Any, **kwargs: Any) -> Any:
            setup = build_setup(*args, **kwargs)
            engine, ema, objective = setup.engine, setup.ema, setup.objective
            engine.backward = timer.wrap("backward", engine.backward)
            engine.step = timer.wrap("optimizer", engine.step)
            objective.loss = timer.wrap("loss", objective.loss)
            ema_update, count = timer.wrap("ema", ema.update), [0]

            def update(*a: Any, **kw: Any) -> None:
                count[0] += 1
                if count[0] == warmup:
                    timer.mark_cpu("start")
                    timer.mark("start")
                ema_update(*a, **kw)
                if count[0] == steps - 1:  # before the last step (its checkpoint is not a per-step cost)
                    timer.mark("end")
                    timer.mark_cpu("end")
            ema.update = update
            return setup

        epoch_stream = streaming.epoch_stream

        def timed_epoch_stream(*args: Any, **kwargs: Any) -> Any:
            """The worker's batch stream (Ray Data iterator to numpy batches), each ``next`` timed as ``data``."""
            stream, files = epoch_stream(*args, **kwargs)
            return timer.wrap_iter("data", stream), files

        worker_setup.build_worker_model = near_free_model
        worker_setup.set_up_worker = set_up
        streaming.epoch_stream = timed_epoch_stream
        train_loop.step_flags = timer.wrap("step_flags", train_loop.step_flags)
        worker.EpochPrefetch.take = timer.wrap("epoch_start", worker.EpochPrefetch.take)
        train_loop.all_reduce_sum = timer.wrap("all_reduce", train_loop.all_reduce_sum)
        ray.train.report = timer.wrap("report", ray.train.report)
        tracking.MetricLogger.record = timer.wrap("log_record", tracking.MetricLogger.record)
        cfg = loop_config["cfg"]
        overrides = [f"data.image_size={cfg['data']['image_size']}", f"data.batch_size={cfg['data']['batch_size']}"]
        torch.set_num_threads(1)  # as the worker sets it (train.cpus_per_worker=1)
        bare_before = bare(steps, warmup, overrides, cfg["seed"])  # same process, same CPU share, seconds apart
        worker.train_loop_per_worker(loop_config)
        bare_after = bare(steps, warmup, overrides, cfg["seed"])
        if ray.train.get_context().get_world_rank() == 0:
            bare_parts = {k: (bare_before[k] + bare_after[k]) / 2 for k in bare_before}
            Path(out_file).write_text(json.dumps({"flowrail": timer.per_step("start", "end", steps - 1 - warmup),
                                                  "bare": bare_parts,
                                                  "threads": timer.cpu_per_step("start", "end", steps - 1 - warmup),
                                                  "processes": timer.process_cpu_per_step("start", "end",
                                                                                          steps - 1 - warmup)}))
    return loop


def flowrail(steps: int, warmup: int, overrides: list[str], run_dir: Path, name: str) -> dict[str, Any]:
    """One ``fit`` run through flowrail's worker loop with the near-free model, and the bare loop in the same Ray
    worker just before and just after it (their mean): ``flowrail`` and ``bare`` parts per step in microseconds,
    ``threads`` and ``processes`` CPU microseconds per step over flowrail's window."""
    import pipeline.train.worker as worker
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.train.trainer import fit

    out = run_dir / f"{name}.json"
    cfg = load_config(TrainJobConfig, "train", overrides + [
        f"run_dir={run_dir}", f"run_name={name}", "train.num_workers=1", f"train.checkpoint_every={steps}"])
    real = worker.train_loop_per_worker
    worker.train_loop_per_worker = near_free_worker_loop(str(out), warmup, steps)  # fit() looks it up per call
    try:
        fit(cfg, make_grid=False)
    finally:
        worker.train_loop_per_worker = real
    result = json.loads(out.read_text())
    print("thread CPU (us per step): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(
        result["threads"].items(), key=lambda kv: -kv[1]) if v >= 5), flush=True)
    print("process CPU (us per step): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(
        result["processes"].items(), key=lambda kv: -kv[1]) if v >= 5), flush=True)
    return result


def cpu_summary(result: dict[str, Any], bare_cpu: float) -> dict[str, float]:
    """CPU microseconds per step: the bare loop's thread; flowrail's loop thread, the worker's other threads, the
    read tasks, Ray's other processes (the whole machine during flowrail's window)."""
    threads, procs = result["threads"], result["processes"]
    reads = sum(v for k, v in procs.items() if k.startswith("ray::Read"))
    ray_other = sum(v for k, v in procs.items() if k != "this worker" and not k.startswith("ray::Read"))
    return {"bare loop thread": bare_cpu, "flowrail loop thread": threads.get("loop", 0.0),
            "flowrail worker, other threads": sum(v for k, v in threads.items() if k != "loop"),
            "read tasks (shard parsing)": reads, "all other processes": ray_other}


def summary(runs: list[dict[str, float]]) -> dict[str, tuple[float, float, float]]:
    """Per part: (median, min, max) over repeats."""
    keys = list(dict.fromkeys(k for r in runs for k in r))
    return {k: (statistics.median(r.get(k, 0.0) for r in runs), min(r.get(k, 0.0) for r in runs),
                max(r.get(k, 0.0) for r in runs)) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epoch-batches", type=int, default=256,
                        help="batches per epoch (shard set of that many batches, whole 4096-sample shards): a "
                             "steady state over several epochs, each epoch's stream started a quarter into the "
                             "one before as in training; 0: one epoch longer than the run")
    parser.add_argument("--flowrail-overrides", nargs="*", default=[],
                        help="extra flowrail config overrides (e.g. train.zero_stage=0)")
    args = parser.parse_args()
    from pipeline.cluster import init_ray
    from pipeline.data.shards import write_shard_set
    from pipeline.data.sources import digits_split

    overrides = ["data.image_size=8", "data.batch_size=64", "data.val_shards=null", f"train.steps={args.steps}",
                 f"train.log_every={args.log_every}", "train.cpus_per_worker=1"]
    init_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        per_shard = 4096
        if not args.epoch_batches:
            samples = 64 * (4 * args.steps + 64)  # the next epoch's prefetch (a quarter in) starts after the run
        else:
            samples = -(-64 * args.epoch_batches // per_shard) * per_shard
        images, labels = digits_split()["train"]
        write_shard_set(root / "digits", ((f"s{i:07d}", {"image.npy": images[i % len(labels)],
                                                         "cls": int(labels[i % len(labels)])})
                                          for i in range(samples)), samples_per_shard=per_shard,
                        extra={"kind": "pixels", "field": "image.npy", "shape": list(IMAGE), "num_classes": 10})
        overrides.append(f"data.shards={root / 'digits'}")
        bare_runs, flow_runs, cpu_runs = [], [], []
        for r in range(args.repeats):
            result = flowrail(args.steps, args.warmup, overrides + args.flowrail_overrides + [
                f"seed={args.seed + r}"], root / "runs", f"r{r}")
            bare_parts = result["bare"]
            flow_runs.append(result["flowrail"])
            bare_runs.append({k: v for k, v in bare_parts.items() if k != CPU_KEY})
            cpu_runs.append(cpu_summary(result, bare_parts[CPU_KEY]))
            print(f"repeat {r}: bare {bare_runs[-1]['step']:.0f} us, flowrail {flow_runs[-1]['step']:.0f} us",
                  flush=True)
    b, f = summary(bare_runs), summary(flow_runs)
    print(f"\n| part (us per step, median [min-max] of {args.repeats}) | bare | flowrail |")
    print("|---|---:|---:|")
    for key in ["step", *[k for k in dict.fromkeys([*b, *f]) if k != "step"]]:
        cell = lambda s: f"{s[key][0]:.0f} [{s[key][1]:.0f}-{s[key][2]:.0f}]" if key in s else "-"  # noqa: E731
        print(f"| {key} | {cell(b)} | {cell(f)} |")
    c = summary(cpu_runs)
    print(f"\n| CPU time (us per step, median [min-max] of {args.repeats}) | |\n|---|---:|")
    for key in c:
        print(f"| {key} | {c[key][0]:.0f} [{c[key][1]:.0f}-{c[key][2]:.0f}] |")
    gaps = [fr["step"] - br["step"] for fr, br in zip(flow_runs, bare_runs)]
    print(f"\nflowrail - bare (per repeat): {', '.join(f'{g:.0f}' for g in gaps)} us per step; median "
          f"{statistics.median(gaps):.0f} (target <= 1000)")


if __name__ == "__main__":
    main()
