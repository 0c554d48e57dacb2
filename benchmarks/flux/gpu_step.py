"""One FLUX-shaped fine-tune step on one GPU: step time and peak memory, LoRA or full fine-tune under DeepSpeed.

    python benchmarks/flux/gpu_step.py --mode lora            # FLUX.1 sizes (19 + 38 blocks), LoRA r16, ZeRO-2
    python benchmarks/flux/gpu_step.py --mode full            # full fine-tune, ZeRO-3 (see --double/--single)
    python benchmarks/flux/gpu_step.py --mode lora --tiny     # CPU smoke test of this script (tiny sizes)

It runs flowrail's own pieces on random weights: ``FluxTransformer2DModel`` with FLUX.1 [dev] layer sizes
(REFERENCE.md section 9), ``pipeline.flux.lora.prepare_for_training`` (LoRA / full, gradient checkpointing),
``pipeline.train.engine.build_engine`` (DeepSpeed ZeRO, bf16, AdamW) and ``FluxObjective.loss``
(1024x1024 images: 128x128 latents = 4096 image tokens, 512 T5 tokens). Prints one markdown table row.

Memory arithmetic for the full fine-tune (flowrail's bf16 = torch autocast over fp32 weights): fp32 weights + fp32
grads + Adam (m, v) = 16 bytes/param, so FLUX.1's 11.9B parameters need ~190 GB; one 80 GB H100 (or 141 GB H200)
holds the full model only with the optimizer offloaded, and that needs ~12 bytes/param (~143 GB) of host memory.
``--mode full`` therefore defaults to a FLUX-width slice (5 double + 10 single blocks, ~3.2B params) on the GPU;
``--double 19 --single 38 --offload`` asks for the whole model where the host has the memory.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("lora", "full"), required=True)
    p.add_argument("--double", type=int, default=None, help="double-stream blocks (default: 19 lora, 5 full)")
    p.add_argument("--single", type=int, default=None, help="single-stream blocks (default: 38 lora, 10 full)")
    p.add_argument("--zero", type=int, default=None, help="ZeRO stage (default: 2 lora, 3 full)")
    p.add_argument("--offload", action="store_true", help="ZeRO CPU offload (optimizer; + params at stage 3)")
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latent = /8)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-grad-ckpt", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.tiny:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)

    import deepspeed
    from diffusers import FluxTransformer2DModel

    from pipeline.config import FluxConfig, TrainConfig, TrainJobConfig
    from pipeline.flux.lora import prepare_for_training
    from pipeline.flux.model import flux1_config, tiny_flux_config
    from pipeline.flux.objective import FluxObjective
    from pipeline.train.engine import build_engine, deepspeed_config

    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu and not args.tiny:
        print("no CUDA device: run on a GPU machine, or pass --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
        # cuDNN's fused attention failed in backward on FLUX shapes (torch 2.11, H100; benchmarks/flux/RESULTS.md)
        torch.backends.cuda.enable_cudnn_sdp(False)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")

    double = args.double if args.double is not None else (19 if args.mode == "lora" else 5)
    single = args.single if args.single is not None else (38 if args.mode == "lora" else 10)
    zero = args.zero if args.zero is not None else (2 if args.mode == "lora" else 3)
    config = tiny_flux_config() if args.tiny else {**flux1_config(), "num_layers": double, "num_single_layers": single}
    latent_side = 8 if args.tiny else args.resolution // 8
    text_len = 8 if args.tiny else args.text_len

    torch.manual_seed(0)
    # LoRA: the frozen base in bf16 (random init directly on the GPU), adapters fp32 (peft's default), bf16 autocast.
    # Full fine-tune: fp32 weights = the master copy that flowrail's bf16 (torch autocast) precision trains.
    dtype = torch.bfloat16 if gpu and args.mode == "lora" else torch.float32
    torch.set_default_dtype(dtype)
    with device:
        model = FluxTransformer2DModel.from_config(config)
    torch.set_default_dtype(torch.float32)
    flux_cfg = FluxConfig(mode=args.mode, lora_rank=args.rank, lora_alpha=float(args.rank),
                          grad_checkpointing=not args.no_grad_ckpt)
    model = prepare_for_training(model, flux_cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    tcfg = TrainConfig(num_workers=1, use_gpu=gpu, zero_stage=zero, offload=args.offload,
                       precision="bf16" if gpu else "fp32", lr=1e-5 if args.mode == "full" else 1e-4)
    if args.offload:
        # flowrail's engine hands DeepSpeed a torch AdamW; with ZeRO-Offload DeepSpeed refuses a client optimizer
        # unless zero_force_ds_cpu_optimizer is false (its CPUAdam needs a C++ build), so build the engine here.
        ds_config = deepspeed_config(tcfg, args.batch, 1)
        ds_config["zero_force_ds_cpu_optimizer"] = False
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=tcfg.lr),
                                          config=ds_config, dist_init_required=False)
    else:
        engine = build_engine(model, tcfg, args.batch, 1)
    job = TrainJobConfig()
    job.model.name = "flux"
    job.transport.time_sampler = "logit_normal"
    job.transport.resolution_shift = True
    objective = FluxObjective.from_config(job)
    gen = torch.Generator(device=device).manual_seed(0)
    batch = {"latent": torch.randn(args.batch, 16, latent_side, latent_side, generator=gen, device=device),
             "t5": torch.randn(args.batch, text_len, config["joint_attention_dim"], generator=gen, device=device),
             "clip_pooled": torch.randn(args.batch, config["pooled_projection_dim"], generator=gen, device=device)}

    def step() -> float:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
        with autocast:
            loss = objective.loss(engine, batch)
        engine.backward(loss)
        engine.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else float("nan")
    name = torch.cuda.get_device_name(device) if gpu else "CPU (tiny smoke test, not a measurement)"
    tokens = (latent_side // 2) ** 2
    print("| mode | ZeRO | offload | blocks (double+single) | params | trainable | image+text tokens | batch | "
          "grad ckpt | step (s) | peak GPU mem (GiB) | device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.mode} | {zero} | {'yes' if args.offload else 'no'} | {config['num_layers']}+"
          f"{config['num_single_layers']} | {_count(total)} | {_count(trainable)} | {tokens}+{text_len} | "
          f"{args.batch} | {'no' if args.no_grad_ckpt else 'yes'} | {seconds:.3f} | {peak:.1f} | {name} |")
    print(f"(last loss {loss:.4f}; torch {torch.__version__}, deepspeed {deepspeed.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
