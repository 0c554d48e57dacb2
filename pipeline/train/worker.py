"""The Ray Train worker loop: the only place that knows it runs distributed.

Per step: batch from this worker's Ray Data split → objective loss → DeepSpeed backward/step → EMA update.
Every ``log_every`` steps the ranks agree on the mean loss and rank 0 logs it; every ``checkpoint_every`` steps
(and at the end) every rank writes its part of a checkpoint and reports it to Ray Train.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import TrainJobConfig
from pipeline.data.streaming import DataInfo
from pipeline.errors import DataError, FlowrailError
from pipeline.train import checkpoint as ckpt_io
from pipeline.train.checkpoint import TrainState


class TooManyBadSteps(FlowrailError):
    """The loss was NaN/Inf more often than ``train.max_bad_steps`` allows."""


def _all_reduce(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (a no-op without a process group)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def build_worker_model(cfg: TrainJobConfig, info: DataInfo) -> torch.nn.Module:
    """The model with the same initial weights on every rank (seeded), optionally initialised from a checkpoint."""
    from pipeline.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, in_channels=info.channels, input_size=info.size, num_classes=info.num_classes,
                        flux_cfg=cfg.flux)
    if cfg.init_from:
        from pipeline.train.init_from import initialise_from

        initialise_from(model, cfg.init_from)
    if cfg.model.name.lower() == "flux":
        from pipeline.flux.model import prepare_for_training

        model = prepare_for_training(model, cfg.flux)
    return model


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    from pipeline.objective import build_objective
    from pipeline.tracking import MetricLogger
    from pipeline.train.ema import EMA
    from pipeline.train.engine import build_engine, resolve_precision

    cfg = TrainJobConfig.model_validate(loop_config["cfg"])
    info = DataInfo(**loop_config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tcfg = cfg.train

    model = build_worker_model(cfg, info)
    ema = EMA(model, tcfg.ema_decay)
    engine = build_engine(model, tcfg, cfg.data.batch_size, world)
    device = engine.device
    ema.model.to(device)
    objective = build_objective(cfg, info.num_classes)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if resolve_precision(tcfg) == "bf16" else nullcontext())

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = ckpt_io.restore(Path(ckpt_dir), engine=engine, ema=ema, rank=rank)
        if rank == 0:
            print(f"[flowrail] resumed from step {state.step} (epoch {state.epoch})", flush=True)
    else:
        torch.manual_seed(cfg.seed * 1009 + rank)  # per-rank noise/time draws

    logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"], cfg.tracking.on_unreachable) \
        if rank == 0 and loop_config.get("run_id") else None
    shard = ray.train.get_dataset_shard("train")
    window = {"loss": 0.0, "n": 0, "samples": 0, "t0": time.perf_counter(), "wait": 0.0}

    def checkpoint_and_report(metrics: dict[str, float]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"flowrail-ckpt-r{rank}-"))
        try:
            ckpt_io.save(tmp, engine=engine, ema=ema, state=state, cfg=cfg, info=info, rank=rank,
                         extra={"mlflow_run_id": loop_config.get("run_id")})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    start_step = state.step
    while state.step < tcfg.steps:
        t_wait = time.perf_counter()
        steps_before = state.step + state.bad_steps
        for batch in shard.iter_torch_batches(batch_size=cfg.data.batch_size, drop_last=True,
                                              local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                              local_shuffle_seed=cfg.seed + 7919 * state.epoch + rank):
            window["wait"] += time.perf_counter() - t_wait
            state.skipped_samples += int(batch.pop("skipped").sum()) if "skipped" in batch else 0
            batch = _to_device(batch, device)
            with autocast:
                loss = objective.loss(engine, batch)
            finite = torch.isfinite(loss.detach()).float().item()
            if _all_reduce([1.0 - finite])[0] > 0:  # every rank skips together, or none does
                state.bad_steps += 1
                engine.zero_grad() if hasattr(engine, "zero_grad") else None
                if state.bad_steps > tcfg.max_bad_steps:
                    raise TooManyBadSteps(f"loss was NaN/Inf in {state.bad_steps} steps "
                                          f"(train.max_bad_steps={tcfg.max_bad_steps}); last step {state.step}")
                t_wait = time.perf_counter()
                continue
            engine.backward(loss)
            engine.step()
            ema.update(engine.module, ema.decay_at(state.step))
            state.step += 1
            window["loss"] += loss.item()
            window["n"] += 1
            window["samples"] += batch["image"].shape[0] if "image" in batch else cfg.data.batch_size

            last = state.step >= tcfg.steps
            if state.step % tcfg.log_every == 0 or last or state.step % tcfg.checkpoint_every == 0:
                loss_sum, n, samples = _all_reduce([window["loss"], window["n"], window["samples"]])
                elapsed = time.perf_counter() - window["t0"]
                metrics = {"loss": loss_sum / max(n, 1), "samples_per_s": samples / max(elapsed, 1e-9),
                           "data_wait_fraction": window["wait"] / max(elapsed, 1e-9),
                           "lr": engine.get_lr()[0] if hasattr(engine, "get_lr") else tcfg.lr,
                           "bad_steps": state.bad_steps, "skipped_samples": state.skipped_samples,
                           "epoch": state.epoch, "step": state.step}
                if logger is not None:
                    logger.log({k: v for k, v in metrics.items() if k != "step"}, step=state.step)
                    done = state.step - start_step
                    eta = elapsed / max(window["n"], 1) * (tcfg.steps - state.step)
                    print(f"[flowrail] step {state.step}/{tcfg.steps}  loss {metrics['loss']:.4f}  "
                          f"{metrics['samples_per_s']:.0f} samples/s  eta {eta:.0f}s  ({done} this attempt)",
                          flush=True)
                window.update(loss=0.0, n=0, samples=0, t0=time.perf_counter(), wait=0.0)
                if state.step % tcfg.checkpoint_every == 0 or last:
                    checkpoint_and_report(metrics)
                else:
                    ray.train.report(metrics)
            if last:
                break
            t_wait = time.perf_counter()
        state.epoch += 1
        if state.step + state.bad_steps == steps_before and state.step < tcfg.steps:
            raise DataError(f"an epoch of {cfg.data.shards} gave worker {rank} no full batch of "
                            f"{cfg.data.batch_size} samples (too few valid samples for data.batch_size)")
    if logger is not None and not logger.flush():
        print(f"[flowrail] {len(logger.pending)} metrics could not be logged: tracking server unreachable", flush=True)
