"""What every training worker builds before its first step, for every stage of the one loop (pipeline/train/loop.py).

CPU threads → the model (same seeded weights on every rank, optionally ``init_from``) → EMA → DeepSpeed engine →
objective and autocast → the state restored from Ray Train's latest checkpoint, if the group was restarted.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import TrainJobConfig
from pipeline.data.streaming import DataInfo
from pipeline.errors import CheckpointError, first_line
from pipeline.train import checkpoint as ckpt_io
from pipeline.train.checkpoint import TrainState


def set_cpu_threads(cpus_per_worker: float) -> int:
    """torch intra-op threads = the CPUs Ray reserved for this worker (at least one), unless ``OMP_NUM_THREADS``
    is set. torch's default is one thread per core of the machine, so workers sharing a node oversubscribe its
    cores."""
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, int(cpus_per_worker)))
    torch.set_num_threads(threads)
    return threads


def construction_scope(cfg: TrainJobConfig, micro_batch: int, world: int,
                       dtype: torch.dtype | None = None) -> AbstractContextManager:
    """Where the model is built: inside ``deepspeed.zero.Init`` under ZeRO-3 (no rank holds the whole model), else
    plainly. Model set-ups that cannot be built partitioned are refused here in one line naming the setting
    (a :class:`FlowrailError`, which the driver reports as such from a Ray worker)."""
    if cfg.train.zero_stage != 3:
        return nullcontext()
    from pipeline.errors import FlowrailError
    from pipeline.train.engine import zero_init

    if cfg.model.name.lower() == "flux" and cfg.flux.dfm:
        raise FlowrailError("flux.dfm=true cannot be built under train.zero_stage=3 (deepspeed.zero.Init): turning "
                          "FLUX into FLUX-DFM copies whole layers; use train.zero_stage=2")
    if cfg.model.name.lower() == "flux" and cfg.flux.weights and Path(cfg.flux.weights).expanduser().is_file():
        raise FlowrailError(f"flux.weights={cfg.flux.weights}: under train.zero_stage=3 FLUX is built partitioned and "
                          "only a diffusers folder can be streamed into it; convert the single file once "
                          "(FluxTransformer2DModel.from_single_file(...).save_pretrained(DIR)) and pass DIR")
    return zero_init(cfg.train, micro_batch, world, dtype)


def build_worker_model(cfg: TrainJobConfig, info: DataInfo, *, micro_batch: int | None = None,
                       world: int = 1) -> torch.nn.Module:
    """The model with the same initial weights on every rank (seeded), optionally initialised from a checkpoint.

    Under ZeRO-3 it is built partitioned (:func:`construction_scope`); ``init_from`` then gathers the whole model
    once on each rank to load it (rank 0's values are kept).
    """
    from pipeline.models import build_model

    torch.manual_seed(cfg.seed)
    flux_dtype = None
    partitioned = cfg.train.zero_stage == 3
    if cfg.model.name.lower() == "flux":
        from pipeline.flux.model import frozen_dtype
        from pipeline.train.engine import resolve_precision

        flux_dtype = frozen_dtype(cfg.flux, resolve_precision(cfg.train))  # under ZeRO-3: the partitions' dtype
    with construction_scope(cfg, micro_batch or cfg.data.batch_size, world, flux_dtype):
        model = build_model(cfg.model, in_channels=info.channels, input_size=info.size, num_classes=info.num_classes,
                            flux_cfg=cfg.flux, flux_dtype=flux_dtype, partitioned=partitioned)
    if cfg.init_from:
        from pipeline.models.zero_init import gathered_for_init
        from pipeline.train.init_from import initialise_from

        try:
            with gathered_for_init(model):
                loaded = initialise_from(model, cfg.init_from, override=cfg.init_from_override)
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"[flowrail] init_from: {loaded}", flush=True)
        except RuntimeError as exc:  # tensor shape mismatch from load_state_dict
            detail = first_line(exc, 300, prefer="size mismatch")
            raise CheckpointError(f"init_from={cfg.init_from}: checkpoint does not fit the model ({detail})") from None
    if cfg.model.name.lower() == "flux":
        from pipeline.flux.model import prepare_for_training

        model = prepare_for_training(model, cfg.flux)
    return model


@dataclass
class WorkerSetup:
    engine: Any  # a DeepSpeed engine
    ema: Any  # pipeline.train.ema.EMA, its model on ``device``
    objective: Any
    device: torch.device
    autocast: AbstractContextManager
    state: TrainState
    resumed: bool  # restored from a checkpoint of this run


def set_up_worker(cfg: TrainJobConfig, info: DataInfo, *, micro_batch: int, world: int, rank: int,
                  restore_extra: Callable[[Path], None] | None = None) -> WorkerSetup:
    """Build this rank's engine, EMA and objective; restore them from Ray Train's latest checkpoint if there is one
    (``restore_extra`` then reads the stage's own files from the checkpoint's directory)."""
    import ray.train

    from pipeline.objective import build_objective
    from pipeline.train.ema import ShardedEMA, make_ema
    from pipeline.train.engine import build_engine, resolve_precision

    tcfg = cfg.train
    set_cpu_threads(tcfg.cpus_per_worker)
    model = build_worker_model(cfg, info, micro_batch=micro_batch, world=world)
    if tcfg.zero_stage == 3:  # the EMA of the partitions the engine made: 1/world of it on each rank
        engine = build_engine(model, tcfg, micro_batch, world)
        ema = make_ema(engine.module, tcfg.ema_decay, tcfg.ema_device)
    else:
        ema = make_ema(model, tcfg.ema_decay, tcfg.ema_device)
        engine = build_engine(model, tcfg, micro_batch, world)
    device = engine.device
    if isinstance(ema, ShardedEMA):
        ema.sample_device = device
    elif not ema.offload:
        ema.model.to(device)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if resolve_precision(tcfg) == "bf16" else nullcontext())
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        from pipeline.train.restore_download import restored_checkpoint_dir

        ctx = ray.train.get_context()
        with restored_checkpoint_dir(checkpoint, local_rank=ctx.get_local_rank(),
                                     node_rank=ctx.get_node_rank()) as ckpt_dir:
            state = ckpt_io.restore(ckpt_dir, engine=engine, ema=ema, rank=rank, world=world, cfg=cfg)
            if restore_extra is not None:
                restore_extra(Path(ckpt_dir))
    return WorkerSetup(engine=engine, ema=ema, objective=build_objective(cfg, info.num_classes), device=device,
                       autocast=autocast, state=state, resumed=bool(checkpoint))
