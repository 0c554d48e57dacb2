"""``init_from=PATH``: start training from existing weights.

PATH may be a flowrail checkpoint (or a run directory holding some; its EMA of the trained parameters is loaded,
frozen parameters keep the values the model was built with), an official
SiT/DiT checkpoint file (``.pt``/``.pth`` dict with model/ema/opt/args, or a bare state dict) or a
``.safetensors`` export.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from pipeline.errors import CheckpointError


def initialise_from(model: nn.Module, path: str) -> str:
    """Load weights into ``model`` in place; returns a one-line description of what was loaded."""
    from safetensors.torch import load_file

    from pipeline.train.checkpoint_read import EMA_FILE, META, find_latest
    from pipeline.train.ema import load_ema_weights

    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"init_from={path}: file or directory does not exist")
    if source.is_dir() and ((source / META).is_file() or any(source.rglob(META))):
        ckpt = find_latest(source)
        missing, unexpected = load_ema_weights(model, load_file(str(ckpt / EMA_FILE)))
        if missing or unexpected:
            raise CheckpointError(f"init_from={path}: checkpoint does not fit the model "
                                  f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        return f"EMA weights of flowrail checkpoint {ckpt}"
    from pipeline.models.checkpoint_import import load_official_checkpoint

    try:
        report = load_official_checkpoint(source, model, use_ema=True)
    except ValueError as exc:
        raise CheckpointError(f"init_from={path}: {exc}") from None
    return f"official checkpoint {source} ({report.loaded} tensors)"
