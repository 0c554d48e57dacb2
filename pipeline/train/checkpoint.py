"""Checkpoints: DeepSpeed engine state (model, optimizer, scheduler; each rank its ZeRO shard) + EMA + metadata.

Layout of one checkpoint directory (Ray merges the ranks' directories into one)::

    flowrail.json          step, epoch, resolved config, data info (rank 0)
    ema.safetensors        full EMA weights, the weights used for sampling (rank 0)
    deepspeed/state/...    DeepSpeed ``save_checkpoint`` output (every rank writes its shard)
    rng/rank<R>.pt         torch RNG state of rank R

Ray only registers a checkpoint once every rank has reported it, so a half-written one is never the latest.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import TrainJobConfig
from pipeline.data.streaming import DataInfo
from pipeline.errors import CheckpointError

META = "flowrail.json"
EMA_FILE = "ema.safetensors"
DS_DIR = "deepspeed"
DS_TAG = "state"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    bad_steps: int = 0
    skipped_samples: int = 0


def save(local_dir: Path, *, engine: Any, ema: Any, state: TrainState, cfg: TrainJobConfig, info: DataInfo,
         rank: int, extra: dict[str, Any] | None = None) -> Path:
    """Write this rank's part of a checkpoint into ``local_dir`` (collective: every rank calls it)."""
    local_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(local_dir / DS_DIR), tag=DS_TAG, client_state={"step": state.step})
    (local_dir / "rng").mkdir(exist_ok=True)
    torch.save({"torch": torch.get_rng_state()}, local_dir / "rng" / f"rank{rank}.pt")
    if rank == 0:
        save_file(ema.state_dict(), str(local_dir / EMA_FILE))
        meta = {"format": "flowrail-checkpoint/1", "step": state.step, "epoch": state.epoch,
                "bad_steps": state.bad_steps, "skipped_samples": state.skipped_samples,
                "config": cfg.model_dump(mode="json"), "data": info.to_dict(), **(extra or {})}
        (local_dir / META).write_text(json.dumps(meta, indent=2))
    return local_dir


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a flowrail checkpoint: {META} is missing")
    return json.loads(path.read_text())


def restore(ckpt_dir: Path, *, engine: Any, ema: Any, rank: int) -> TrainState:
    """Load engine, EMA and RNG state from a checkpoint; returns the step and epoch to continue from."""
    meta = read_meta(ckpt_dir)
    load_path, _ = engine.load_checkpoint(str(Path(ckpt_dir) / DS_DIR), tag=DS_TAG)
    if load_path is None:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no DeepSpeed state under {DS_DIR}/{DS_TAG}")
    ema.model.load_state_dict(load_file(str(Path(ckpt_dir) / EMA_FILE)))
    rng_file = Path(ckpt_dir) / "rng" / f"rank{rank}.pt"
    if rng_file.is_file():
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    return TrainState(step=meta["step"], epoch=meta["epoch"], bad_steps=meta.get("bad_steps", 0),
                      skipped_samples=meta.get("skipped_samples", 0))


def _step_of(path: Path) -> int:
    try:
        return int(read_meta(path)["step"])
    except (CheckpointError, KeyError, ValueError, json.JSONDecodeError):
        return -1


def find_latest(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest complete checkpoint under a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / META).is_file():
        return path
    candidates = [p for p in path.rglob(META)]
    complete = [p.parent for p in candidates if (p.parent / EMA_FILE).is_file()]
    if not complete:
        raise CheckpointError(f"no flowrail checkpoint found under {path}")
    return max(complete, key=lambda p: (_step_of(p), p.stat().st_mtime))


@dataclass
class Trained:
    """A trained model ready for sampling: EMA weights in eval mode, its objective and config."""

    config: TrainJobConfig
    model: nn.Module
    objective: Any
    data: DataInfo
    step: int
    path: Path
    run_id: str | None = None

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.data.channels, self.data.size, self.data.size)


def load_trained(path: str | Path, overrides: TrainJobConfig | None = None) -> Trained:
    """Load a flowrail checkpoint's EMA model and objective (sampling settings may be overridden)."""
    from pipeline.models import build_model
    from pipeline.objective import build_objective

    ckpt = find_latest(path)
    meta = read_meta(ckpt)
    cfg = overrides or TrainJobConfig.model_validate(meta["config"])
    info = DataInfo(**meta["data"])
    model = build_model(cfg.model, in_channels=info.channels, input_size=info.size, num_classes=info.num_classes,
                        flux_cfg=cfg.flux)
    state = load_file(str(ckpt / EMA_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not fit model '{cfg.model.name}': "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.eval().requires_grad_(False)
    return Trained(config=cfg, model=model, objective=build_objective(cfg, info.num_classes), data=info,
                   step=int(meta["step"]), path=ckpt, run_id=meta.get("mlflow_run_id"))


def checkpoint_name(step: int) -> str:
    return f"step{step:08d}"


_STEP_RE = re.compile(r"step(\d+)")
