"""What every training worker builds before its first step, shared by the main loop and the privacy loop.

CPU threads → the model (same seeded weights on every rank, optionally ``init_from``) → EMA → DeepSpeed engine →
objective and autocast → the state restored from Ray Train's latest checkpoint, if the group was restarted.
"""
from __future__ import annotations

import os
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


def build_worker_model(cfg: TrainJobConfig, info: DataInfo) -> torch.nn.Module:
    """The model with the same initial weights on every rank (seeded), optionally initialised from a checkpoint."""
    from pipeline.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, in_channels=info.channels, input_size=info.size, num_classes=info.num_classes,
                        flux_cfg=cfg.flux)
    if cfg.init_from:
        from pipeline.train.init_from import initialise_from

        try:
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


def set_up_worker(cfg: TrainJobConfig, info: DataInfo, *, micro_batch: int, world: int, rank: int) -> WorkerSetup:
    """Build this rank's engine, EMA and objective; restore them from Ray Train's latest checkpoint if there is one."""
    import ray.train

    from pipeline.objective import build_objective
    from pipeline.train.ema import EMA
    from pipeline.train.engine import build_engine, resolve_precision

    tcfg = cfg.train
    set_cpu_threads(tcfg.cpus_per_worker)
    model = build_worker_model(cfg, info)
    ema = EMA(model, tcfg.ema_decay)
    engine = build_engine(model, tcfg, micro_batch, world)
    device = engine.device
    ema.model.to(device)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if resolve_precision(tcfg) == "bf16" else nullcontext())
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = ckpt_io.restore(Path(ckpt_dir), engine=engine, ema=ema, rank=rank)
    return WorkerSetup(engine=engine, ema=ema, objective=build_objective(cfg, info.num_classes), device=device,
                       autocast=autocast, state=state, resumed=bool(checkpoint))
