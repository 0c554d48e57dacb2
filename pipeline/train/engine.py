"""DeepSpeed engine construction: ZeRO stage, precision, AdamW, gradient clipping, warm-up.

The optimizer is a plain ``torch.optim.AdamW`` handed to DeepSpeed as client optimizer (DeepSpeed's fused Adam
builds C++ at run time, which CPU machines often cannot do).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import TrainConfig


def resolve_precision(cfg: TrainConfig) -> str:
    """``auto`` means bf16 on GPU and fp32 on CPU (DeepSpeed has no fp16 on CPU)."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if cfg.use_gpu and torch.cuda.is_available() else "fp32"


PRESET_DIR = Path(__file__).with_name("presets")  # shipped as package data (pyproject.toml)


def preset_path(value: str) -> Path:
    """``train.deepspeed_preset``: a shipped preset's name (``zero2``, ``zero3``, ``zero3_offload``) or a path."""
    from pipeline.config import DEEPSPEED_PRESETS

    return PRESET_DIR / f"{value}.json" if value in DEEPSPEED_PRESETS else Path(value).expanduser()


def load_preset(path: str) -> dict[str, Any]:
    """A DeepSpeed JSON preset (a shipped name or a file); a clear error when it is missing or not JSON."""
    import json

    from pipeline.errors import FlowrailError

    preset = preset_path(path)
    if not preset.is_file():
        raise FlowrailError(f"train.deepspeed_preset={path}: file not found")
    try:
        data = json.loads(preset.read_text())
    except json.JSONDecodeError as exc:
        raise FlowrailError(f"train.deepspeed_preset={path}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise FlowrailError(f"train.deepspeed_preset={path}: must hold a JSON object")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def global_batch(cfg: TrainConfig, micro_batch: int, world_size: int) -> int:
    """Samples per optimizer step: ``micro_batch x grad_accum_steps x world_size``."""
    return micro_batch * cfg.grad_accum_steps * world_size


def effective_zero_stage(cfg: TrainConfig, world_size: int) -> int:
    """The ZeRO stage DeepSpeed runs: ``train.zero_stage``, except 0 for ZeRO-1/2 on one worker when
    ``train.stage0_single_worker`` (nothing to partition; no preset, no offload)."""
    if (cfg.stage0_single_worker and world_size == 1 and cfg.zero_stage in (1, 2) and not cfg.offload
            and not cfg.deepspeed_preset):
        return 0
    return cfg.zero_stage


def model_width(model: nn.Module) -> int:
    """The model's hidden width h: the largest ``min(in_features, out_features)`` of its Linear layers (SiT's and
    FLUX's blocks map h to h, 3h or 4h; under ``deepspeed.zero.Init`` the layers keep these attributes)."""
    widths = [min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    return max(widths, default=0)


def zero3_comm_sizes(width: int) -> dict[str, int]:
    """ZeRO-3 communication sizes from the model width h, Hugging Face's ``auto`` rule: gradient reduce bucket h²,
    prefetch bucket 0.9 h² elements, parameters under 10 h elements kept whole. DeepSpeed's defaults are sized for
    no model in particular: a 5e8-element reduce bucket (1.9 GiB of fp32 gradients on every rank, filled by the
    backward of any model that large, whatever the world size)."""
    return {"reduce_bucket_size": width * width, "stage3_prefetch_bucket_size": int(0.9 * width * width),
            "stage3_param_persistence_threshold": 10 * width}


def deepspeed_config(cfg: TrainConfig, micro_batch: int, world_size: int, width: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config that matches a flowrail ``train`` section (over an optional preset).

    flowrail owns the batch sizes, clipping, precision, ZeRO stage and offload; a preset supplies the rest
    (bucket sizes, prefetching, ...). A preset whose ZeRO stage disagrees with ``train.zero_stage`` is refused.
    Without a preset, ZeRO-3's bucket sizes follow the model's ``width`` (:func:`zero3_comm_sizes`) when it is given.
    """
    stage = effective_zero_stage(cfg, world_size)
    zero: dict[str, Any] = {"stage": stage}
    owned_extra: dict[str, Any] = {}
    if stage >= 2 and not cfg.deepspeed_preset:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if cfg.zero_stage == 3 and not cfg.deepspeed_preset:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False})
        if width:
            zero.update(zero3_comm_sizes(width))
    if cfg.offload:
        if cfg.zero_stage < 2:
            raise ValueError("train.offload=true needs train.zero_stage=2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
        # flowrail hands DeepSpeed a torch AdamW; without this ZeRO-Offload insists on its own (C++-built) CPU Adam
        owned_extra["zero_force_ds_cpu_optimizer"] = False
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    owned = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": global_batch(cfg, micro_batch, world_size),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        # bf16 = torch autocast over fp32 weights (DeepSpeed's torch_autocast; Linear/Conv grads reduced in bf16).
        # Not DeepSpeed's "bf16" section: that casts the module to bf16 and switches the caller's autocast off
        # inside engine.forward, so any fp32 tensor a model makes in forward (time embeddings) meets bf16 weights.
        "bf16": {"enabled": False},
        "torch_autocast": {"enabled": resolve_precision(cfg) == "bf16", "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        **owned_extra,
    }
    if not cfg.deepspeed_preset:
        return owned
    preset = load_preset(cfg.deepspeed_preset)
    stage = preset.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != cfg.zero_stage:
        from pipeline.errors import FlowrailError

        raise FlowrailError(f"train.deepspeed_preset={cfg.deepspeed_preset} is a ZeRO-{stage} preset but "
                            f"train.zero_stage={cfg.zero_stage}")
    return _merge(preset, owned)


def quiet_deepspeed_deprecations() -> None:
    """Silence the torch deprecations DeepSpeed triggers at every ZeRO step on several ranks.

    DeepSpeed 0.19's ZeRO collectives call ``torch.distributed.all_gather_into_tensor`` and ``reduce_scatter_tensor``,
    which torch 2.13 deprecates (FutureWarning). Python would print each once, but Ray Data's tensor conversion enters
    ``warnings.catch_warnings`` at every batch, which clears the registry of warnings already shown (``once``
    filters too), so every rank printed them at every step through Ray's log streaming. Nothing a user can act on.
    """
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning)


def select_accelerator(cfg: TrainConfig) -> None:
    """DeepSpeed's accelerator, decided by the run's config, not by the driver's hardware (a cluster head often has
    no GPU); must run before ``deepspeed`` is first imported in this process."""
    if not cfg.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    elif os.environ.get("DS_ACCELERATOR") == "cpu":
        del os.environ["DS_ACCELERATOR"]


def zero_init(cfg: TrainConfig, micro_batch: int, world_size: int, dtype: torch.dtype | None = None) -> Any:
    """``deepspeed.zero.Init`` for this run's DeepSpeed config: modules built inside it are partitioned across the
    ranks layer by layer as they are made (ZeRO-3 construction; with ``train.offload`` the partitions go to the CPU).

    ``dtype``: the parameters' dtype (a bf16 LoRA run's frozen FLUX base); None: the config's (fp32, flowrail
    trains fp32 masters under autocast)."""
    select_accelerator(cfg)
    import deepspeed

    quiet_deepspeed_deprecations()
    # DeepSpeed's communication layer over the existing torch process group (its config checks the world size)
    deepspeed.init_distributed(dist_init_required=False, verbose=False)
    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, micro_batch, world_size), dtype=dtype)


def fused_adamw(cfg: TrainConfig) -> bool:
    """AdamW as one fused kernel (over ZeRO's flat fp32 partition) where the optimizer state lives on the GPU: a GPU
    run without ``train.offload``; else torch's default (foreach) implementation."""
    return bool(cfg.use_gpu and torch.cuda.is_available() and not cfg.offload)


def build_engine(model: nn.Module, cfg: TrainConfig, micro_batch: int, world_size: int) -> Any:
    """Wrap ``model`` in a DeepSpeed engine (or, ``train.engine=torch``, flowrail's single-rank
    :class:`~pipeline.train.torch_engine.TorchEngine`) with AdamW and a linear warm-up (``torch.compile``d if
    ``cfg.compile``)."""
    select_accelerator(cfg)
    import deepspeed

    quiet_deepspeed_deprecations()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  fused=fused_adamw(cfg) or None)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    if cfg.engine == "torch":
        from pipeline.train.torch_engine import TorchEngine, check_torch_engine, engine_device

        check_torch_engine(cfg, world_size)
        engine = TorchEngine(model, optimizer, scheduler, cfg, engine_device(cfg))
        if cfg.compile:
            engine.compile(backend=cfg.compile_backend)
        return engine
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, micro_batch, world_size, width=model_width(model)), dist_init_required=False)
    if cfg.compile:
        # nn.Module.compile in place: state_dict keys, checkpoints and the EMA see the plain module
        engine.compile(backend=cfg.compile_backend)
    return engine
