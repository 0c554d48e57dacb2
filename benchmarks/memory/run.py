"""Per-rank memory of the flowrail ZeRO path: ZeRO-2 vs ZeRO-3, world size 1 and 2, FLUX LoRA and full, SiT full.

Each configuration runs ``world`` processes on gloo (CPU). Every rank builds its model the way the training worker
does (``build_worker_model``: under ZeRO-3 inside ``deepspeed.zero.Init``), wraps it in the DeepSpeed engine
(``build_engine``), makes the EMA (``make_ema``: the sharded one under ZeRO-3), takes one step, and after the second
backward (gradients, optimizer state and EMA all alive) counts the bytes of the tensors it owns
(``benchmarks/memory/count.py``) and its peak RSS.

    PYTHONPATH=$PWD python -m benchmarks.memory.run --out benchmarks/memory/results.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

FLUX_REAL_WIDTH = ["model.name=flux", "flux.grad_checkpointing=false"]
MODELS = {
    # FLUX.1 widths (hidden 3072 = 24 heads x 128, T5 4096, CLIP 768), 1 double + 1 single block: 545.5 M params
    "flux_lora": [*FLUX_REAL_WIDTH, "flux.mode=lora", "flux.lora_rank=16"],
    "flux_full": [*FLUX_REAL_WIDTH, "flux.mode=full"],
    # SiT-XL/2 widths (hidden 1152, 16 heads, patch 2, 4-channel 32x32 latents) with `depth` blocks instead of 28
    "sit_xl2": ["model.name=sit", "model.hidden_size=1152", "model.num_heads=16", "model.patch_size=2",
                "model.learn_sigma=true"],
}
FLUX1_1X1 = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1,
                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _batch(model: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if model.startswith("flux"):
        return {"latent": torch.randn(1, 16, 4, 4, generator=gen), "t5": torch.randn(1, 4, 4096, generator=gen),
                "clip_pooled": torch.randn(1, 768, generator=gen)}
    return {"image": torch.randn(1, 4, 32, 32, generator=gen), "label": torch.randint(0, 1000, (1,), generator=gen)}


def _rank(rank: int, world: int, model: str, stage: int, depth: int, base: str, init_file: str, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from benchmarks.memory.count import Ledger, count_ema, count_grads, count_optimizer, count_params
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.data.streaming import DataInfo
    from pipeline.objective import build_objective
    from pipeline.train.ema import make_ema
    from pipeline.train.engine import build_engine
    from pipeline.train.worker_setup import build_worker_model

    # stage0_single_worker=false: a ZeRO-2 row at world 1 is ZeRO-2 (flowrail would run stage 0 there by default)
    overrides = [*MODELS[model], f"train.zero_stage={stage}", "train.precision=fp32", "train.lr=1e-4",
                 "train.stage0_single_worker=false"]
    if model.startswith("flux"):
        overrides.append(f"flux.weights={base}")
        info = DataInfo(kind="latents", field="latent.npy", channels=16, size=4, num_classes=0, num_samples=2)
    else:
        overrides.append(f"model.depth={depth}")
        info = DataInfo(kind="pixels", field="image.npy", channels=4, size=32, num_classes=1000, num_samples=2)
    cfg = load_config(TrainJobConfig, None, overrides)
    t0 = time.perf_counter()
    net = build_worker_model(cfg, info, micro_batch=1, world=world)
    if stage == 3:
        engine = build_engine(net, cfg.train, 1, world)
        ema = make_ema(engine.module, 0.999)
    else:
        ema = make_ema(net, 0.999)
        engine = build_engine(net, cfg.train, 1, world)
    objective = build_objective(cfg, info.num_classes)
    gen = torch.Generator().manual_seed(rank)
    ledger = Ledger()
    for step in range(2):
        loss = objective.loss(engine, _batch(model, gen))
        engine.backward(loss)
        if step == 1:
            count_params(ledger, engine.module)
            count_grads(ledger, engine)
            count_optimizer(ledger, engine)
            count_ema(ledger, ema)
        engine.step()
        ema.update(engine.module, ema.decay_at(step))
    trained = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    out[rank] = {**ledger.bytes, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                 "trained_elements": trained, "elements": total, "seconds": time.perf_counter() - t0}
    dist.destroy_process_group()


def run(model: str, world: int, stage: int, depth: int, base: str) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(world, model, stage, depth, base, str(Path(tmp) / "init"), out), nprocs=world,
                 join=True)
        ranks = [dict(out[r]) for r in range(world)]
    return {"model": model, "depth": depth if model == "sit_xl2" else None, "world": world, "zero_stage": stage,
            "ranks": ranks}


def report(path: str) -> str:
    """Markdown table of a results file: the largest rank's bytes (GiB) and its ratio to the world-1 run."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    keys = ("params", "grads", "optimizer", "ema")
    worst = {(r["model"], r["zero_stage"], r["world"]): max(r["ranks"], key=lambda b: sum(b[k] for k in keys))
             for r in rows}
    lines = ["| model | ZeRO | world | params | grads | optimizer | EMA | total per rank | / world 1 | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, stage, world), b in worst.items():
        total = sum(b[k] for k in keys)
        base = worst.get((model, stage, 1))
        ratio = f"{total / sum(base[k] for k in keys):.3f}" if base else "-"
        cells = " | ".join(f"{b[k] / 2**30:.3f}" for k in keys)
        lines.append(f"| {model} | {stage} | {world} | {cells} | {total / 2**30:.3f} | {ratio} | "
                     f"{b['peak_rss'] / 2**30:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/memory/results.jsonl")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--worlds", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--stages", nargs="*", type=int, default=[2, 3])
    parser.add_argument("--sit-depth", type=int, default=4, help="SiT-XL/2 blocks (28 in the paper model)")
    parser.add_argument("--flux-base", default=None, help="diffusers folder of the FLUX-width model (made if absent)")
    parser.add_argument("--report", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args()
    if args.report:
        print(report(args.out))
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = args.flux_base or str(Path(tempfile.gettempdir()) / "flowrail-memory-flux-base")
    if any(m.startswith("flux") for m in args.models) and not (Path(base) / "config.json").is_file():
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        FluxTransformer2DModel.from_config(FLUX1_1X1).save_pretrained(base)
    for model in args.models:
        for stage in args.stages:
            for world in args.worlds:
                row = run(model, world, stage, args.sit_depth, base)
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                per_rank = max(sum(r[k] for k in ("params", "grads", "optimizer", "ema")) for r in row["ranks"])
                print(f"{model} ZeRO-{stage} world {world}: {per_rank / 2**20:.0f} MiB per rank "
                      f"(peak RSS {max(r['peak_rss'] for r in row['ranks']) / 2**20:.0f} MiB)", flush=True)


if __name__ == "__main__":
    main()
