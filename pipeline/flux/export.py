"""A finished FLUX fine-tune -> what users load: a diffusers LoRA file or a diffusers transformer folder, in MLflow.

Reads a flowrail training checkpoint on the driver (no DeepSpeed, no process group): its config and its EMA
weights (``ema.safetensors``: the EMA of the trained tensors, i.e. the LoRA adapter in LoRA mode and every weight
in full mode; with ``train.ema_decay=0`` these are the last training weights). The model is rebuilt from
``flux.weights`` (and ``init_from`` if set), the adapter re-added in LoRA mode, every trained tensor loaded, and
:func:`pipeline.flux.lora.save_finetuned` writes the result.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from pipeline.config import TrainJobConfig
from pipeline.errors import CheckpointError
from pipeline.flux.lora import prepare_for_training, save_finetuned
from pipeline.flux.model import build_flux_model

ARTIFACT = {"lora": "flux_lora", "full": "flux_transformer"}


def load_finetuned_from_checkpoint(checkpoint: str | Path, cfg: TrainJobConfig | None = None):
    """``(model, cfg)``: the EMA FLUX transformer of a flowrail checkpoint (LoRA adapter attached in LoRA mode)."""
    from pipeline.train.checkpoint_read import EMA_FILE, find_latest, read_meta
    from pipeline.train.ema import load_ema_weights

    ckpt = find_latest(checkpoint)
    cfg = cfg or TrainJobConfig.model_validate(read_meta(ckpt)["config"])
    if cfg.model.name.lower() != "flux":
        raise CheckpointError(f"checkpoint {ckpt} is a '{cfg.model.name}' run, not a FLUX fine-tune")
    model = build_flux_model(cfg.flux)
    if cfg.init_from:  # the frozen weights are the ones training started from
        from pipeline.train.init_from import initialise_from

        initialise_from(model, cfg.init_from, override=cfg.init_from_override)
    model = prepare_for_training(model, cfg.flux.model_copy(update={"grad_checkpointing": False}))
    missing, unexpected = load_ema_weights(model, load_file(str(ckpt / EMA_FILE)))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not fit the FLUX model of flux.weights={cfg.flux.weights} "
                              f"(missing {list(missing)[:2]}, unexpected {list(unexpected)[:2]})")
    return model.eval(), cfg


def export_finetuned(checkpoint: str | Path, out_dir: str | Path, cfg: TrainJobConfig | None = None) -> Path:
    """Write the LoRA file (``flux.mode=lora``) or diffusers folder (``full``) of a checkpoint to ``out_dir``."""
    model, cfg = load_finetuned_from_checkpoint(checkpoint, cfg)
    return save_finetuned(model, cfg.flux, out_dir)


def log_finetuned(out_dir: str | Path, mode: str, tracking_uri: str, run_id: str) -> str:
    """Log an exported fine-tune as MLflow artifacts of ``run_id``; returns the artifact path."""
    from mlflow.tracking import MlflowClient

    artifact = ARTIFACT[mode]
    MlflowClient(tracking_uri).log_artifacts(run_id, str(out_dir), artifact_path=artifact)
    return artifact
