"""One-GPU benchmark: SiT-XL/2 on 256 px latents (32x32x4), bf16 — images/s and model FLOPs utilisation (MFU),
for a bare PyTorch loop and for flowrail's path (Ray Data latent shards → Ray Train → DeepSpeed) on the same GPU.

    PYTHONUNBUFFERED=1 python benchmarks/gpu/run.py --batch 128 --steps 30 --out $OUT
    python benchmarks/gpu/run.py --flops-only        # CPU: count the model FLOPs on the meta device

Model FLOPs are counted, not assumed: ``torch.utils.flop_counter.FlopCounterMode`` over one forward of the real
module on the meta device (2 FLOPs per multiply-add). SiT-XL/2 at 32x32x4 counts 237.2 GFLOPs per image forward
= 118.6 GMACs, the "118.6 Gflops" of the DiT paper (which counts multiply-adds); forward + backward counts
3.00x forward = 711.7 GFLOPs per image. MFU = images/s x training FLOPs per image / the card's dense bf16 peak
(H100 SXM / H200: 989.4 TFLOP/s; pass ``--peak-tflops`` for others). No activation recomputation is counted.

bare      fp32 master weights, ``torch.autocast(bf16)``, fused AdamW, the flowrail transport loss (linear path,
          velocity), EMA every step (``torch._foreach_lerp_``), loss read back only at the end.
flowrail  ``pipeline.train.trainer.fit`` with 1 GPU worker (DeepSpeed bf16, ZeRO-2), random latent shards
          written by ``ShardSetWriter``; images/s is the median of the logged windows (first and last dropped).
          Needs ray, deepspeed and mlflow importable; skipped with a note otherwise. With ``--compile`` both paths
          are timed again compiled (bare: ``torch.compile``; flowrail: ``train.compile=true`` = ``engine.compile()``).
Results are printed as a markdown table and written to ``--out``/gpu_results.md with the card, date and command.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def build(input_size: int = 32, channels: int = 4, num_classes: int = 1000) -> torch.nn.Module:
    from pipeline.config import ModelConfig
    from pipeline.models import build_model

    return build_model(ModelConfig(name="SiT-XL/2"), in_channels=channels, input_size=input_size,
                       num_classes=num_classes)


def count_flops() -> tuple[float, float, int]:
    """(forward, forward+backward) FLOPs per image and the parameter count, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build()
        x, t, y = torch.randn(2, 4, 32, 32), torch.rand(2), torch.randint(0, 1000, (2,))
    fwd = FlopCounterMode(display=False)
    with fwd:
        model(x, t, y)
    both = FlopCounterMode(display=False)
    with both:
        model(x, t, y).float().square().mean().backward()
    return fwd.get_total_flops() / 2, both.get_total_flops() / 2, sum(p.numel() for p in model.parameters())


def bare(batch: int, steps: int, warmup: int, compile_model: bool) -> float:
    """Images/s of a bare bf16-autocast training loop on the GPU."""
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.objective import build_objective

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build().to(dev)
    ema = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    net = torch.compile(model) if compile_model else model
    objective = build_objective(load_config(TrainJobConfig, "train", ["model.name=SiT-XL/2"]), 1000)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    x = torch.randn(batch, 4, 32, 32, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    total = torch.zeros((), device=dev)
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective.loss(net, {"image": x, "label": y})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.9999)
        total += loss.detach()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    assert torch.isfinite(total).item()
    del model, net, opt, ema, params, loss
    torch.cuda.empty_cache()  # the flowrail worker is another process on the same GPU
    return batch * steps / elapsed


def flowrail(batch: int, steps: int, root: Path, tracking_uri: str | None = None, compile_model: bool = False) -> float:
    """Images/s of flowrail's training path (median logged window) on one GPU."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.data.shards import write_shard_set
    from pipeline.train.trainer import fit

    n = batch * (steps + 8)
    rng = np.random.default_rng(0)
    write_shard_set(root / "latents", ((f"s{i:07d}", {"latent.npy": rng.standard_normal((4, 32, 32), np.float32),
                                                      "cls": int(i % 1000)}) for i in range(n)),
                    samples_per_shard=1024, extra={"kind": "latents", "field": "latent.npy", "shape": [4, 32, 32],
                                                   "num_classes": 1000, "latent_scale": 1.0})
    log_every = max(steps // 6, 2)
    cfg = load_config(TrainJobConfig, "train", [
        f"data.shards={root / 'latents'}", "data.val_shards=null", f"data.batch_size={batch}",
        "model.name=SiT-XL/2", f"train.steps={steps}", "train.num_workers=1", "train.use_gpu=true",
        "train.cpus_per_worker=8", "train.precision=bf16", "train.zero_stage=2", "train.lr=1e-4",
        f"train.log_every={log_every}", f"train.checkpoint_every={steps}", f"run_dir={root / 'runs'}",
        f"train.compile={str(compile_model).lower()}", "run_name=gpu-bench",
        *([f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else [])])
    result = fit(cfg, make_grid=False)
    hist = sorted((m.step, m.value) for m in
                  MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "samples_per_s"))
    wait = [m.value for m in MlflowClient(result.tracking_uri).get_metric_history(result.run_id,
                                                                                  "data_wait_fraction")]
    print(f"flowrail windows (step, images/s): {hist}; data_wait_fraction: {wait}", flush=True)
    return statistics.median(v for _, v in (hist[1:-1] or hist))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 64], help="tried in order until one fits")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--compile", action="store_true",
                        help="also time the bare loop with torch.compile and flowrail with train.compile=true (last)")
    parser.add_argument("--skip-flowrail", action="store_true")
    parser.add_argument("--flops-only", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of the flowrail run (default: sqlite)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    fwd, train_flops, n_params = count_flops()
    print(f"SiT-XL/2 32x32x4: {n_params / 1e6:.1f} M parameters; forward {fwd / 1e9:.1f} GFLOPs/image "
          f"({fwd / 2e9:.1f} GMACs); forward+backward {train_flops / 1e9:.1f} GFLOPs/image "
          f"({train_flops / fwd:.2f}x forward)", flush=True)
    if args.flops_only:
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu/run.py needs a CUDA GPU (use --flops-only on CPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(card)
    header = [(f"- card: {card}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
               f"date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}"),
              f"- command: `python {' '.join(sys.argv)}`",
              (f"- model FLOPs: forward {fwd / 1e9:.1f} GFLOPs/image, training (fwd+bwd) {train_flops / 1e9:.1f} "
               f"GFLOPs/image; peak bf16 {peak or '?'} TFLOP/s"), "",
              "| path | batch | images/s | model TFLOP/s | MFU | vs bare |", "|---|---:|---:|---:|---:|---:|"]
    rows: list[str] = []
    base: list[float] = []

    def emit(name: str, b: int, ips: float) -> None:
        """Print the row and rewrite the results file at once: a later path that crashes loses nothing."""
        base.append(base[0] if base else ips)
        tflops = ips * train_flops / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "?"
        rows.append(f"| {name} | {b} | {ips:,.0f} | {tflops:.0f} | {mfu} | {ips / base[0]:.2f} |")
        print(rows[-1], flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_results.md").write_text("\n".join(header + rows) + "\n")

    batch = None
    for b in args.batch:
        gc.collect()
        torch.cuda.empty_cache()  # what a batch that did not fit left behind
        try:
            ips = bare(b, args.steps, args.warmup, False)
            batch = b
            break
        except torch.OutOfMemoryError:
            print(f"batch {b} does not fit: trying the next", flush=True)
    if batch is None:
        sys.exit(f"no batch size of {args.batch} fits on {card}")
    emit("bare PyTorch (eager)", batch, ips)

    def emit_flowrail(name: str, compile_model: bool) -> None:
        if args.skip_flowrail:
            return
        try:
            with tempfile.TemporaryDirectory() as tmp:
                emit(name, batch, flowrail(batch, args.steps * 2, Path(tmp), args.tracking_uri, compile_model))
        except Exception as exc:  # noqa: BLE001 - a failed path must not cost the rows after it
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)

    emit_flowrail("flowrail (Ray Data → Ray Train → DeepSpeed ZeRO-2 bf16)", compile_model=False)
    if args.compile:
        emit("bare PyTorch (torch.compile)", batch, bare(batch, args.steps, args.warmup, True))
        emit_flowrail("flowrail, train.compile=true", compile_model=True)
    print("\n".join(header + rows), flush=True)


if __name__ == "__main__":
    main()
