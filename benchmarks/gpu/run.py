"""One-GPU benchmark: SiT-XL/2 on 256 px latents (32x32x4), bf16 — images/s and model FLOPs utilisation (MFU),
for a bare PyTorch loop and for flowrail's path (Ray Data latent shards → Ray Train → DeepSpeed) on the same GPU.

    PYTHONUNBUFFERED=1 python benchmarks/gpu/run.py --batch 64 auto --steps 20 --compile --out $OUT
    python benchmarks/gpu/run.py --flops-only        # CPU: count the model FLOPs on the meta device
    python benchmarks/gpu/run.py --dry-run           # CPU: the same paths on a tiny SiT, a few steps (plumbing check)

Paths, each at every ``--batch`` (a number, or ``auto``: the batch ``data.batch_size=auto`` picks, i.e. 90% of the
largest batch whose training step fits, found by ``pipeline.train.batch_probe``; probed once, used by every path):
bare eager, flowrail eager, and with ``--compile`` bare compiled and flowrail compiled.

Model FLOPs are counted, not assumed: ``torch.utils.flop_counter.FlopCounterMode`` over one forward of the real
module on the meta device (2 FLOPs per multiply-add). SiT-XL/2 at 32x32x4 counts 237.2 GFLOPs per image forward
= 118.6 GMACs, the "118.6 Gflops" of the DiT paper (which counts multiply-adds); forward + backward counts
3.00x forward = 711.7 GFLOPs per image. MFU = images/s x training FLOPs per image / the card's dense bf16 peak
(H100 SXM / H200: 989.4 TFLOP/s; pass ``--peak-tflops`` for others). No activation recomputation is counted.

bare      fp32 master weights, ``torch.autocast(bf16)``, fused AdamW, the flowrail transport loss (linear path,
          velocity), EMA every step (``torch._foreach_lerp_``), loss read back only at the end.
flowrail  ``pipeline.train.trainer.fit`` with 1 worker (DeepSpeed bf16 autocast; one worker runs ZeRO-2 as stage 0,
          ``train.stage0_single_worker``), random latent shards written by ``ShardSetWriter``; images/s is the
          median of the logged windows (first and last dropped). With ``--compile``: ``train.compile=true``.
``--dry-run`` runs all of it on the CPU (tiny SiT on 8x8x4 latents, fp32, ``aot_eager`` compile backend, a few
steps; ``auto`` probes up to ``--dry-run-max-batch``, since a CPU never runs out of memory): it checks the script,
not the numbers. Results are printed as a markdown table and written to ``--out``/gpu_results.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


@dataclass(frozen=True)
class Target:
    """What is measured: the model (flowrail ``model.*`` overrides), latent shape, device, precision."""

    model: list[str]
    shape: tuple[int, int, int]
    device: str
    bf16: bool
    compile_backend: str = "inductor"
    num_classes: int = 1000


GPU = Target(["model.name=SiT-XL/2"], (4, 32, 32), "cuda", True)
DRY_RUN = Target(["model.name=sit", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                  "model.patch_size=2"], (4, 8, 8), "cpu", False, compile_backend="aot_eager", num_classes=10)


def build(target: Target = GPU) -> torch.nn.Module:
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.models import build_model

    cfg = load_config(TrainJobConfig, None, target.model)
    return build_model(cfg.model, in_channels=target.shape[0], input_size=target.shape[1],
                       num_classes=target.num_classes)


def objective_for(target: Target) -> object:
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.objective import build_objective

    return build_objective(load_config(TrainJobConfig, "train", target.model), target.num_classes)


def autocast(target: Target) -> torch.autocast:
    return torch.autocast(target.device, dtype=torch.bfloat16, enabled=target.bf16)


def sample(target: Target, batch: int) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(batch, *target.shape), "label": torch.randint(0, target.num_classes, (batch,))}


def auto_batch(target: Target, limit: int) -> int:
    """What ``data.batch_size=auto`` picks for this model on this device (the probe flowrail's workers run)."""
    from pipeline.train.batch_probe import largest_fitting, step_fits, with_headroom

    fits = step_fits(lambda: build(target), objective_for(target), lambda b: sample(target, b),
                     torch.device(target.device), autocast(target))
    found = largest_fitting(fits, start=min(32, limit), limit=limit)  # SiT-XL/2 fits 32 on any card worth timing
    print(f"largest batch whose training step fits: {found}; data.batch_size=auto keeps {with_headroom(found)}",
          flush=True)
    return with_headroom(found)


def count_flops(target: Target = GPU) -> tuple[float, float, int]:
    """(forward, forward+backward) FLOPs per image and the parameter count, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build(target)
        x, t, y = torch.randn(2, *target.shape), torch.rand(2), torch.randint(0, target.num_classes, (2,))
    fwd = FlopCounterMode(display=False)
    with fwd:
        model(x, t, y)
    both = FlopCounterMode(display=False)
    with both:
        model(x, t, y).float().square().mean().backward()
    return fwd.get_total_flops() / 2, both.get_total_flops() / 2, sum(p.numel() for p in model.parameters())


def synchronize(target: Target) -> None:
    if target.device == "cuda":
        torch.cuda.synchronize()


def bare(batch: int, steps: int, warmup: int, compile_model: bool, target: Target = GPU) -> float:
    """Images/s of a bare (bf16-autocast on the GPU) training loop."""
    dev = torch.device(target.device)
    torch.manual_seed(0)
    model = build(target).to(dev)
    ema = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    net = torch.compile(model, backend=target.compile_backend) if compile_model else model
    objective = objective_for(target)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=target.device == "cuda" or None)
    data = {k: v.to(dev) for k, v in sample(target, batch).items()}
    total = torch.zeros((), device=dev)
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(target)
            t0 = time.perf_counter()
        with autocast(target):
            loss = objective.loss(net, data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.9999)
        total += loss.detach()
    synchronize(target)
    elapsed = time.perf_counter() - t0
    assert torch.isfinite(total).item()
    del model, net, opt, ema, params, loss
    if target.device == "cuda":
        torch.cuda.empty_cache()  # the flowrail worker is another process on the same GPU
    return batch * steps / elapsed


def write_latents(root: Path, n: int, target: Target) -> Path:
    import numpy as np

    from pipeline.data.shards import write_shard_set

    rng = np.random.default_rng(0)
    write_shard_set(root / "latents", ((f"s{i:07d}", {"latent.npy": rng.standard_normal(target.shape, np.float32),
                                                      "cls": int(i % target.num_classes)}) for i in range(n)),
                    samples_per_shard=1024, extra={"kind": "latents", "field": "latent.npy", "shape": list(target.shape),
                                                   "num_classes": target.num_classes, "latent_scale": 1.0})
    return root / "latents"


def flowrail(batch: int, steps: int, root: Path, tracking_uri: str | None = None, compile_model: bool = False,
             target: Target = GPU, engine: str = "deepspeed") -> float:
    """Images/s of flowrail's training path (median logged window) on one worker, with ``train.engine=engine``."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.train.trainer import fit

    shards = write_latents(root, batch * (steps + 8), target)
    log_every = max(steps // 6, 2)
    gpu = target.device == "cuda"
    cfg = load_config(TrainJobConfig, "train", [
        f"data.shards={shards}", "data.val_shards=null", f"data.batch_size={batch}", *target.model,
        f"train.steps={steps}", "train.num_workers=1", f"train.use_gpu={str(gpu).lower()}",
        f"train.cpus_per_worker={8 if gpu else 1}", f"train.precision={'bf16' if target.bf16 else 'fp32'}",
        "train.lr=1e-4", f"train.log_every={log_every}", f"train.checkpoint_every={steps}",
        f"run_dir={root / 'runs'}", f"train.compile={str(compile_model).lower()}",
        f"train.compile_backend={target.compile_backend}", "run_name=gpu-bench", "data.verify_checksums=false",
        f"train.engine={engine}", *([f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else [])])
    result = fit(cfg, make_grid=False)
    hist = sorted((m.step, m.value) for m in
                  MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "samples_per_s"))
    wait = [m.value for m in MlflowClient(result.tracking_uri).get_metric_history(result.run_id,
                                                                                  "data_wait_fraction")]
    print(f"flowrail windows (step, images/s): {hist}; data_wait_fraction: {wait}", flush=True)
    return statistics.median(v for _, v in (hist[1:-1] or hist))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", nargs="+", default=["64", "auto"],
                        help="per-worker batches, each a number or auto (what data.batch_size=auto picks)")
    parser.add_argument("--steps", type=int, default=20, help="timed bare steps (flowrail: --flowrail-steps)")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--flowrail-steps", type=int, default=None, help="flowrail's steps (default: 2 x --steps)")
    parser.add_argument("--max-batch", type=int, default=4096, help="largest batch the auto probe tries")
    parser.add_argument("--compile", action="store_true",
                        help="also time the bare loop with torch.compile and flowrail with train.compile=true")
    parser.add_argument("--skip-flowrail", action="store_true")
    parser.add_argument("--engine", choices=["deepspeed", "torch"], default="torch",
                        help="flowrail's train.engine (one worker: torch is the plain PyTorch engine)")
    parser.add_argument("--flops-only", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny SiT, few steps: checks the script only")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of the flowrail run (default: sqlite)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    target = DRY_RUN if args.dry_run else GPU
    if args.dry_run:
        args.max_batch = min(args.max_batch, 16)

    fwd, train_flops, n_params = count_flops(target)
    print(f"{' '.join(target.model)} {'x'.join(map(str, target.shape))}: {n_params / 1e6:.1f} M parameters; "
          f"forward {fwd / 1e9:.3f} GFLOPs/image; forward+backward {train_flops / 1e9:.3f} GFLOPs/image "
          f"({train_flops / fwd:.2f}x forward)", flush=True)
    if args.flops_only:
        return
    if target.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu/run.py needs a CUDA GPU (use --flops-only or --dry-run on CPU)")
    if target.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        card = torch.cuda.get_device_name()
    else:
        card, _ = "CPU (dry run)", torch.set_num_threads(1)
    peak = None if args.dry_run else (args.peak_tflops or peak_tflops(card))
    header = [(f"- card: {card}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
               f"date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}"),
              f"- command: `python {' '.join(sys.argv)}`",
              (f"- model FLOPs: forward {fwd / 1e9:.1f} GFLOPs/image, training (fwd+bwd) {train_flops / 1e9:.1f} "
               f"GFLOPs/image; peak bf16 {peak or '?'} TFLOP/s"), "",
              "| path | batch | images/s | model TFLOP/s | MFU | vs bare (same batch, same mode) |",
              "|---|---:|---:|---:|---:|---:|"]
    rows: list[str] = []

    def emit(name: str, b: int, ips: float, bare_ips: float | None) -> None:
        """Print the row and rewrite the results file at once: a later path that crashes loses nothing."""
        tflops = ips * train_flops / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "?"
        ratio = f"{ips / bare_ips:.3f}" if bare_ips else "-"
        rows.append(f"| {name} | {b} | {ips:,.1f} | {tflops:.1f} | {mfu} | {ratio} |")
        print(rows[-1], flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_results.md").write_text("\n".join(header + rows) + "\n")

    def timed(what: str, fn, *a, **kw) -> float | None:
        """``fn`` (images/s), or None with one line when it runs out of memory or fails."""
        gc.collect()
        if target.device == "cuda":
            torch.cuda.empty_cache()  # what an earlier path left behind
        try:
            return fn(*a, **kw)
        except Exception as exc:  # noqa: BLE001 - a failed path must not cost the rows after it
            print(f"{what} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            return None

    flow_steps = args.flowrail_steps or 2 * args.steps
    batches: list[int] = []
    for value in args.batch:
        b = auto_batch(target, args.max_batch) if value == "auto" else int(value)
        if b not in batches:
            batches.append(b)
    modes = [False, True] if args.compile else [False]
    for b in batches:
        for compiled in modes:
            mode = "torch.compile" if compiled else "eager"
            bare_ips = timed(f"bare {mode} batch {b}", bare, b, args.steps, args.warmup, compiled, target)
            if bare_ips is not None:
                emit(f"bare PyTorch ({mode})", b, bare_ips, None)
            if args.skip_flowrail:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                ips = timed(f"flowrail {mode} batch {b}", flowrail, b, flow_steps, Path(tmp), args.tracking_uri,
                            compiled, target, args.engine)
            if ips is not None:
                emit(f"flowrail ({mode}{', train.compile=true' if compiled else ''}, train.engine={args.engine})", b,
                     ips, bare_ips)
    print("\n".join(header + rows), flush=True)
    if not rows:
        sys.exit("no path was measured")


if __name__ == "__main__":
    main()
