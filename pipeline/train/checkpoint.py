"""Checkpoints: DeepSpeed engine state (model, optimizer, scheduler; each rank its ZeRO shard) + EMA + metadata.

Layout of one checkpoint directory (Ray merges the ranks' directories into one)::

    flowrail.json          step, epoch, resolved config, data info (rank 0)
    ema.safetensors        EMA of the trained parameters, the weights used for sampling (rank 0); frozen
                           parameters and buffers are not saved: they come from building the model
    deepspeed/state/...    DeepSpeed ``save_checkpoint`` output (every rank writes its shard); without the frozen
                           parameters when the model has some (a LoRA base): ``frozen_base`` in ``flowrail.json``
                           names what they are rebuilt from (:mod:`pipeline.train.frozen_base`)
    torch_engine/state/engine.pt   instead of deepspeed/, under ``train.engine=torch`` (one rank)
    rng/rank<R>.pt         torch RNG state of rank R
    manifest/rank<R>.json  SHA-256 of every file rank R wrote (HMAC-signed with the job's key if it has one):
                           checked before anything is loaded (:mod:`pipeline.train.checkpoint_trust`)

A half-written checkpoint is never the latest:
- each rank writes into a local temporary directory; ``flowrail.json`` is written last (temp file + rename);
- Ray Train uploads every rank's directory and registers the checkpoint (``checkpoint_manager_snapshot.json``)
  only after all ranks reported it; :func:`find_latest` only considers registered checkpoints when the snapshot
  exists, and otherwise requires ``flowrail.json``, ``ema.safetensors`` and every rank's ``rng/rank<R>.pt``.
A write that fails (e.g. a full disk) raises :class:`CheckpointError` naming the directory; the previous
checkpoint is untouched (nothing is ever written into an existing checkpoint).
"""
from __future__ import annotations

import errno
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import TrainJobConfig
from pipeline.data.streaming import DataInfo
from pipeline.errors import CheckpointError, FlowrailError, first_line
from pipeline.tracking import shareable_config

from pipeline.train.frozen_base import base_reference, check_base, has_frozen
from pipeline.train.checkpoint_trust import verify, weights_only_engine_loads, write_manifest
from pipeline.train.checkpoint_read import (  # noqa: F401 - re-exported: reading sits below FLUX export/init_from
    EMA_FILE,
    META,
    RAY_SNAPSHOT,
    find_latest,
    is_complete,
    read_meta,
    registered_checkpoints,
    world_size_error,
)

DS_DIR = "deepspeed"
DS_TAG = "state"
TORCH_ENGINE_DIR = "torch_engine"  # train.engine=torch: torch_engine/state/engine.pt in place of deepspeed/state/


def engine_dir(engine: Any) -> str:
    """Where ``engine`` keeps its state in a checkpoint: ``deepspeed`` or ``torch_engine``."""
    from pipeline.train.torch_engine import TorchEngine

    return TORCH_ENGINE_DIR if isinstance(engine, TorchEngine) else DS_DIR


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    bad_steps: int = 0
    skipped_samples: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed (good or skipped): the data position
    # this rank's pipeline.data.epoch_stream.StreamPosition after its last consumed batch (window, offset, batches);
    # saved per rank beside its RNG state. None: start of the epoch, or a checkpoint from before it existed
    data_position: list[int] | None = None


def _write_failure(local_dir: Path, exc: BaseException) -> str:
    """A short reason for a failed checkpoint write; a full filesystem is named as such."""
    import shutil

    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on device"
    try:
        if shutil.disk_usage(local_dir).free < (1 << 20):
            return "no space left on device"
    except OSError:
        pass
    return first_line(exc)


def disk_full_error(exc: BaseException) -> OSError | None:
    """The "no space left on device" error in ``exc``'s cause chain (pyarrow's copy to storage keeps only its text)."""
    from pipeline.errors import find_in_chain

    found = find_in_chain(exc, OSError)
    if found is not None and (found.errno == errno.ENOSPC or "No space left on device" in str(found)):
        return found
    return None


def save(local_dir: Path, *, engine: Any, ema: Any, state: TrainState, cfg: TrainJobConfig, info: DataInfo,
         rank: int, world: int = 1, extra: dict[str, Any] | None = None) -> Path:
    """Write this rank's part of a checkpoint into ``local_dir`` (collective: every rank calls it).

    ``flowrail.json`` (rank 0) is written last and atomically, so a directory that has it has everything of rank 0.
    """
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
        # frozen parameters (a LoRA base, fixed tables) are rebuilt by constructing the model: not saved
        lean = engine_dir(engine) == DS_DIR and has_frozen(engine.module)
        engine.save_checkpoint(str(local_dir / engine_dir(engine)), tag=DS_TAG, client_state={"step": state.step},
                               **({"exclude_frozen_parameters": True} if lean else {}))
        (local_dir / "rng").mkdir(exist_ok=True)
        torch.save({"torch": torch.get_rng_state(), "data_position": state.data_position},
                   local_dir / "rng" / f"rank{rank}.pt")
        ema_state = ema.checkpoint_state(rank)  # a gather under ZeRO-3 (every rank takes part), else rank 0's copy
        if rank != 0:
            write_manifest(local_dir, rank, state.step)
        else:
            save_file(ema_state, str(local_dir / EMA_FILE))
            meta = {"format": "flowrail-checkpoint/1", "step": state.step, "epoch": state.epoch,
                    "batch_in_epoch": state.batch_in_epoch, "world_size": world,
                    "bad_steps": state.bad_steps, "skipped_samples": state.skipped_samples,
                    "config": shareable_config(cfg.model_dump(mode="json")), "data": info.to_dict(),
                    "frozen_base": base_reference(cfg) if lean else None, **(extra or {})}
            text = json.dumps(meta, indent=2)
            write_manifest(local_dir, rank, state.step, pending={META: text.encode()})
            tmp = local_dir / f".{META}.tmp"
            tmp.write_text(text)
            os.replace(tmp, local_dir / META)
    except (OSError, RuntimeError) as exc:  # torch.save/safetensors report a full disk as RuntimeError
        raise CheckpointError(f"could not write checkpoint {local_dir} at step {state.step}: {_write_failure(local_dir, exc)}; "
                              f"the previous checkpoint is kept") from None
    return local_dir


def restore(ckpt_dir: Path, *, engine: Any, ema: Any, rank: int, world: int | None = None,
            cfg: TrainJobConfig | None = None) -> TrainState:
    """Load engine, EMA and RNG state from a checkpoint; returns the step and epoch to continue from.

    ``world``: this run's number of workers; a checkpoint of another world size is refused before anything is
    loaded (its ZeRO optimizer state is partitioned per rank). Every file is checked against the checkpoint's
    manifests first (collective), and the engine state is read weights-only. A checkpoint saved without its frozen
    parameters is resumed only when the base this run builds (``cfg``; else the checkpoint's own config) is the one
    it was trained on (:func:`pipeline.train.frozen_base.check_base`).
    """
    meta = read_meta(ckpt_dir)
    saved_world = int(meta.get("world_size", 1))
    if world is not None and saved_world != world:
        raise world_size_error(ckpt_dir, saved_world, world)
    running = engine_dir(engine)
    written = TORCH_ENGINE_DIR if (Path(ckpt_dir) / TORCH_ENGINE_DIR).is_dir() else DS_DIR
    if written != running:
        names = {DS_DIR: "deepspeed", TORCH_ENGINE_DIR: "torch"}
        raise CheckpointError(f"checkpoint {ckpt_dir} was written with train.engine={names[written]} and this run has "
                              f"train.engine={names[running]}: resume with train.engine={names[written]}")
    verify(Path(ckpt_dir), saved_world)  # every file against its rank's manifest, before any is loaded
    frozen_base = meta.get("frozen_base")
    if frozen_base:
        check_base(Path(ckpt_dir), frozen_base, cfg or TrainJobConfig.model_validate(meta["config"]))
    with weights_only_engine_loads(engine):
        if frozen_base and running == DS_DIR:  # the frozen parameters keep the values the model was built with
            load_path, _ = engine.load_checkpoint(str(Path(ckpt_dir) / running), tag=DS_TAG, load_module_strict=False)
        else:
            load_path, _ = engine.load_checkpoint(str(Path(ckpt_dir) / running), tag=DS_TAG)
    if load_path is None:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no engine state under {running}/{DS_TAG}")
    try:
        ema.load_state_dict(load_file(str(Path(ckpt_dir) / EMA_FILE)))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {EMA_FILE} does not fit this model ({str(exc)[:300]})") from None
    rng_file = Path(ckpt_dir) / "rng" / f"rank{rank}.pt"
    rank_state = torch.load(rng_file, weights_only=True) if rng_file.is_file() else {}
    if "torch" in rank_state:
        torch.set_rng_state(rank_state["torch"])
    position = rank_state.get("data_position")
    return TrainState(step=meta["step"], epoch=meta["epoch"], bad_steps=meta.get("bad_steps", 0),
                      skipped_samples=meta.get("skipped_samples", 0), batch_in_epoch=meta.get("batch_in_epoch", 0),
                      data_position=[int(v) for v in position] if position else None)


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
    from pipeline.train.ema import load_ema_weights

    ckpt = find_latest(path)
    meta = read_meta(ckpt)
    try:
        cfg = overrides or TrainJobConfig.model_validate(meta["config"])
        info = DataInfo(**meta["data"])
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} has metadata this flowrail cannot read "
                              f"({first_line(exc)})") from None
    if cfg.model.name.lower() == "flux":
        from pipeline.flux.evaluation import flux_eval_view
        from pipeline.flux.export import load_finetuned_from_checkpoint

        model, cfg = load_finetuned_from_checkpoint(ckpt, cfg)
        trained = Trained(config=cfg, model=model.requires_grad_(False), objective=build_objective(cfg, info.num_classes),
                          data=info, step=int(meta["step"]), path=ckpt, run_id=meta.get("mlflow_run_id"))
        try:  # label -> caption sampling where the run's shard set is readable (evaluation workers load this way)
            return flux_eval_view(trained, cfg)
        except (OSError, ValueError, FlowrailError) as exc:
            print(f"[flowrail] checkpoint {ckpt}: no caption sampling for this FLUX model "
                  f"({first_line(exc)}); pass text embeddings "
                  "(cond t5, clip_pooled) to objective.sample", file=sys.stderr, flush=True)
            return trained
    model = build_model(cfg.model, in_channels=info.channels, input_size=info.size, num_classes=info.num_classes,
                        flux_cfg=cfg.flux)
    try:
        state = load_file(str(ckpt / EMA_FILE))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise CheckpointError(f"checkpoint {ckpt}: {EMA_FILE} cannot be read ({first_line(exc)})") from None
    try:
        missing, unexpected = load_ema_weights(model, state)
    except RuntimeError as exc:  # shape mismatch
        detail = first_line(exc, 300, prefer="size mismatch")
        raise CheckpointError(f"checkpoint {ckpt} does not fit model '{cfg.model.name}': {detail}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt} does not fit model '{cfg.model.name}': "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.eval().requires_grad_(False)
    return Trained(config=cfg, model=model, objective=build_objective(cfg, info.num_classes), data=info,
                   step=int(meta["step"]), path=ckpt, run_id=meta.get("mlflow_run_id"))


def checkpoint_name(step: int) -> str:
    return f"step{step:08d}"


_STEP_RE = re.compile(r"step(\d+)")
