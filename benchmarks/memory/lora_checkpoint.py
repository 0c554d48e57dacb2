"""LoRA checkpoint bytes against the trained state: the tiny FLUX LoRA (1 double + 1 single block) through the real
flowrail path (``build_worker_model`` from a saved ``flux.weights`` folder, ``build_engine``, ``make_ema``, one
AdamW step, :func:`pipeline.train.checkpoint.save`), world 1, CPU, gloo; then a resume into a freshly built engine
(the frozen base comes from ``flux.weights``) that must give the same trained and frozen tensors.

    PYTHONPATH=$PWD python -m benchmarks.memory.lora_checkpoint [--stages 2 3] [--width tiny|flux]

Reported per ZeRO stage: the checkpoint's bytes by part, and ``trained + optimizer`` = trained parameters (fp32)
+ the optimizer state a resume needs (fp32 master copy + two AdamW moments) = ``16 * n_trained`` bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run(stage: int, root: Path, width: str, lora_rank: int = 4) -> dict:
    from diffusers import FluxTransformer2DModel

    from pipeline.config import TrainJobConfig
    from pipeline.data.streaming import DataInfo
    from pipeline.flux.model import tiny_flux_config
    from pipeline.flux.objective import flux_velocity
    from pipeline.train import checkpoint as ckpt_io
    from pipeline.train.ema import make_ema
    from pipeline.train.engine import build_engine
    from pipeline.train.worker_setup import build_worker_model

    base = root / "base"
    if not base.exists():
        torch.manual_seed(0)
        config = tiny_flux_config()
        if width == "flux":  # FLUX.1 widths, 1 + 1 blocks
            config.update(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                          pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
        FluxTransformer2DModel.from_config(config).save_pretrained(base)
    cfg = TrainJobConfig.model_validate({
        "model": {"name": "flux"}, "flux": {"weights": str(base), "mode": "lora", "lora_rank": lora_rank,
                                            "grad_checkpointing": False},
        "train": {"zero_stage": stage, "stage0_single_worker": False, "lr": 1e-3, "ema_decay": 0.9}})
    info = DataInfo(kind="latents", field="latent.npy", channels=16, size=4, num_classes=2, num_samples=4)

    def built(seed: int):
        torch.manual_seed(seed)
        model = build_worker_model(cfg, info, micro_batch=2, world=1)
        if stage == 3:
            engine = build_engine(model, cfg.train, 2, 1)
            return engine, make_ema(engine.module, cfg.train.ema_decay)
        ema = make_ema(model, cfg.train.ema_decay)
        return build_engine(model, cfg.train, 2, 1), ema

    engine, ema = built(0)
    gen = torch.Generator().manual_seed(9)
    cond = config_dims(engine.module)
    x = torch.randn(2, 16, 4, 4, generator=gen)
    t5, pooled = torch.randn(2, 5, cond[0], generator=gen), torch.randn(2, cond[1], generator=gen)
    loss = (flux_velocity(engine.module.train(), x, torch.tensor([0.4, 0.6]), t5, pooled, 1.0) - 1).pow(2).mean()
    engine.backward(loss)
    engine.step()
    ema.update(engine.module)
    n_trained = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    n_frozen = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if not p.requires_grad)
    ckpt = root / f"ckpt_zero{stage}"
    ckpt_io.save(ckpt, engine=engine, ema=ema, state=ckpt_io.TrainState(step=1), cfg=cfg, info=info, rank=0)
    want = _state(engine)

    fresh, fresh_ema = built(1)  # other LoRA initial values; the frozen base is flux.weights again
    ckpt_io.restore(ckpt, engine=fresh, ema=fresh_ema, rank=0, world=1, cfg=cfg)
    got = _state(fresh)
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    reference = 16 * n_trained
    total = _du(ckpt)
    return {"stage": stage, "width": width, "lora_rank": lora_rank, "n_trained": n_trained, "n_frozen": n_frozen,
            "bytes_total": total, "bytes_deepspeed": _du(ckpt / "deepspeed"),
            "bytes_ema": _du(ckpt / ckpt_io.EMA_FILE), "trained_plus_optimizer_bytes": reference,
            "ratio": total / reference, "restored_max_abs_diff": worst,
            "files": {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*")) if p.is_file()}}


def config_dims(model: torch.nn.Module) -> tuple[int, int]:
    """(T5 width, pooled CLIP width) of a FLUX transformer."""
    return int(model.config.joint_attention_dim), int(model.config.pooled_projection_dim)


def _state(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params) if partitioned else torch.no_grad():
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--width", choices=["tiny", "flux"], default="tiny")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
    os.environ.setdefault("MASTER_PORT", "29633")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="flowrail-lora-ckpt-") as tmp:
        for stage in args.stages:
            rows.append(run(stage, Path(tmp), args.width, args.lora_rank))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
