"""Where a training step's time goes, one process, no Ray: bare PyTorch vs the pieces flowrail's worker adds.

    python benchmarks/train_overhead/step_costs.py --steps 60 --rounds 5

Same model (the default ``train`` config's SiT on 16x16 digits), same batch, one torch thread, world size 1
(a gloo process group of one, as Ray Train sets up). Variants, run round-robin so that machine load hits all alike:
  bare         objective loss → backward → clip → torch AdamW → EMA (the bare loop of run.py)
  bare+syncs   bare + the worker's per-step host syncs: ``isfinite(loss).item()``, ``loss.item()`` and two
               one-float ``all_reduce`` calls (epoch-end agreement, NaN-guard agreement)
  ds-zero0     DeepSpeed engine, ZeRO stage 0, with the worker's syncs
  ds-zero2     DeepSpeed engine, ZeRO stage 2 (flowrail's default), with the worker's syncs
  ds-zero2-1sync  ZeRO-2 with one combined all_reduce and the loss kept on device (the proposed worker loop)
Reports the median step time per variant (median over rounds of the per-round mean).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--overrides", nargs="*", default=["data.image_size=16", "data.batch_size=64"])
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29731"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    import torch.nn.functional as F

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.data.sources import digits_split
    from pipeline.models import build_model
    from pipeline.objective import build_objective
    from pipeline.train.ema import EMA
    from pipeline.train.engine import build_engine

    dist.init_process_group("gloo", rank=0, world_size=1)
    deepspeed.init_distributed("gloo", dist_init_required=False)
    cfg = load_config(TrainJobConfig, "train", args.overrides)
    x, y = digits_split()["train"]
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = F.interpolate(x, size=(cfg.data.image_size,) * 2, mode="bilinear", antialias=True).clamp(-1, 1)
    y = torch.from_numpy(y)
    objective = build_objective(cfg, 10)
    bs = cfg.data.batch_size

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model, in_channels=1, input_size=cfg.data.image_size, num_classes=10)

    def reduce(vals: list[float]) -> list[float]:
        t = torch.tensor(vals, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    g = torch.Generator().manual_seed(0)

    def batch() -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(y), (bs,), generator=g)
        return {"image": x[idx], "label": y[idx]}

    def make_bare(syncs: bool):
        model = fresh_model()
        ema = EMA(model, cfg.train.ema_decay)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        state = {"step": 0}

        def step() -> None:
            b = batch()
            if syncs:
                reduce([0.0])
            loss = objective.loss(model, b)
            if syncs:
                finite = torch.isfinite(loss.detach()).float().item()
                reduce([1.0 - finite])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            state["step"] += 1
            ema.update(model, ema.decay_at(state["step"]))
            if syncs:
                loss.item()
        return step

    def make_ds(stage: int, one_sync: bool):
        tcfg = cfg.train.model_copy(update={"zero_stage": stage})
        model = fresh_model()
        ema = EMA(model, cfg.train.ema_decay)
        engine = build_engine(model, tcfg, bs, 1)
        state = {"step": 0, "loss": torch.zeros(())}

        def step() -> None:
            b = batch()
            if not one_sync:
                reduce([0.0])
            loss = objective.loss(engine, b)
            finite = torch.isfinite(loss.detach()).float().item()
            reduce([0.0, 1.0 - finite])
            engine.backward(loss)
            engine.step()
            state["step"] += 1
            ema.update(engine.module, ema.decay_at(state["step"]))
            if one_sync:
                state["loss"] += loss.detach()
            else:
                loss.item()
        return step

    variants = {"bare": make_bare(False), "bare+syncs": make_bare(True), "ds-zero0": make_ds(0, False),
                "ds-zero2": make_ds(2, False), "ds-zero2-1sync": make_ds(2, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        for _ in range(5):
            fn()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t) / args.steps)
    base = statistics.median(times["bare"])
    print("| variant | step (ms) | vs bare |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.2f} | {m / base:.3f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
