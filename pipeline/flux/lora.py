"""Fine-tuning modes for FLUX: LoRA (peft) or full, and saving in the formats diffusers reads back.

- LoRA: ``W x + (alpha / r) B A x`` on ``flux.lora_targets`` (attention q/k/v/out and the text-stream projections by
  default), A gaussian, B zero, so training starts from the base model's output; the base weights are frozen.
  Saved with ``FluxPipeline.save_lora_weights`` (``pytorch_lora_weights.safetensors``, keys ``transformer.*``,
  adapter config in the safetensors metadata), the file ``FluxPipeline.load_lora_weights`` reads.
- full: every weight trains; saved as a diffusers transformer folder (``save_pretrained``).
- FLUX-DFM (``flux.dfm``) in either mode also writes its stage layers to ``flux_dfm_stages.safetensors``
  (:func:`pipeline.flux.dfm.load_stage_layers` reads them back).

Under DeepSpeed ZeRO-3 the parameters are partitioned across ranks; :func:`save_finetuned` gathers them, so it must
be called on every rank (only rank 0 writes).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from pipeline.config import FluxConfig
from pipeline.flux.objective import unwrap

ADAPTER = "default"
LORA_FILE = "pytorch_lora_weights.safetensors"


def lora_config(flux_cfg: FluxConfig) -> LoraConfig:
    return LoraConfig(r=flux_cfg.lora_rank, lora_alpha=flux_cfg.lora_alpha, target_modules=list(flux_cfg.lora_targets),
                      init_lora_weights="gaussian")


def prepare_for_training(model: FluxTransformer2DModel, flux_cfg: FluxConfig) -> FluxTransformer2DModel:
    """LoRA mode: freeze the base and add the adapter (trainable); full mode: train everything.

    With ``flux.dfm`` the transformer first becomes a two-stage FLUX-DFM (:func:`pipeline.flux.dfm.to_flux_dfm`),
    whose new stage layers train in both modes. Enables gradient checkpointing when ``flux.grad_checkpointing`` is set.
    """
    if flux_cfg.dfm:
        from pipeline.flux.dfm import REPLACED, to_flux_dfm

        if flux_cfg.mode == "lora" and (clash := [t for t in flux_cfg.lora_targets if t in REPLACED]):
            raise ValueError(f"flux.lora_targets: {clash[0]!r} cannot take a LoRA with flux.dfm=true "
                             "(it becomes a per-stage layer)")
        model = to_flux_dfm(model)
    if flux_cfg.mode == "lora":
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
        missing = [t for t in flux_cfg.lora_targets if t not in names and not any(n.endswith("." + t) for n in names)]
        if missing:
            raise ValueError(f"flux.lora_targets: no module named {missing[0]!r} in the FLUX transformer")
        model.requires_grad_(False)
        model.add_adapter(lora_config(flux_cfg), adapter_name=ADAPTER)
        if flux_cfg.dfm:
            from pipeline.flux.dfm import stage_parameters

            for _, p in stage_parameters(model):
                p.requires_grad_(True)
    elif flux_cfg.mode == "full":
        model.requires_grad_(True)
    else:
        raise ValueError(f"flux.mode={flux_cfg.mode!r} is unknown (allowed: lora, full)")
    if flux_cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if torch.cuda.is_available():
        # cuDNN's fused attention failed in backward on FLUX shapes (torch 2.11, H100: benchmarks/flux/RESULTS.md);
        # flash / memory-efficient attention remain
        torch.backends.cuda.enable_cudnn_sdp(False)
    model.train()
    return model


def _gathered(model: nn.Module):
    """Context that materialises ZeRO-3 partitioned parameters (a collective: every rank must enter it)."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_finetuned(model: nn.Module, flux_cfg: FluxConfig, out_dir: str | Path) -> Path:
    """Write the LoRA weights (diffusers LoRA format) or the full transformer (diffusers folder) to ``out_dir``."""
    inner = unwrap(model)
    out = Path(out_dir)
    with _gathered(inner):
        if not _is_main():
            return out
        out.mkdir(parents=True, exist_ok=True)
        if flux_cfg.mode == "lora":
            layers = {k: v.detach().to("cpu", copy=True).contiguous()
                      for k, v in get_peft_model_state_dict(inner, adapter_name=ADAPTER).items()}
            meta = inner.peft_config[ADAPTER].to_dict()
            meta = {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}
            FluxPipeline.save_lora_weights(out, transformer_lora_layers=layers, weight_name=LORA_FILE,
                                           transformer_lora_adapter_metadata=meta)
        else:
            inner.save_pretrained(out, safe_serialization=True)
        from pipeline.flux.dfm import STAGE_FILE, is_flux_dfm, stage_parameters

        if is_flux_dfm(inner):  # diffusers knows no FLUX-DFM: its stage layers go to a file of their own
            from safetensors.torch import save_file

            save_file({n: p.detach().to("cpu", copy=True).contiguous() for n, p in stage_parameters(inner)},
                      str(out / STAGE_FILE))
    return out


def load_lora(model: FluxTransformer2DModel, lora_dir: str | Path,
              adapter_name: str = ADAPTER) -> FluxTransformer2DModel:
    """Load a LoRA saved by :func:`save_finetuned` into ``model`` through diffusers' FLUX LoRA loader."""
    path = Path(lora_dir)
    if not (path / LORA_FILE).is_file():
        raise FileNotFoundError(f"no {LORA_FILE} in {path}")
    state, alphas, metadata = FluxPipeline.lora_state_dict(str(path), weight_name=LORA_FILE, return_alphas=True,
                                                            return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=model,
                                            adapter_name=adapter_name, metadata=metadata)
    return model
