"""The Ray Train worker: the spine's stage of the one training loop (:mod:`pipeline.train.loop`).

:func:`start_worker` is what every stage's worker does before its first step (quiet logs, system metrics, the
engine/EMA/objective restored from the latest checkpoint, seeds, rank 0's metric logger with the run's spool, the
test hooks). :class:`SpineStage` is the spine's batch source and loss: batches from this worker's deterministic
stream (:func:`pipeline.data.streaming.epoch_stream`), the objective's loss.

Resume: a restarted worker group (``train.max_failures``) or a re-run restores model, optimizer, EMA, RNG and the
data position (epoch, batches consumed in it, this rank's stream position) from the latest checkpoint and starts
its stream at that position, reading only the files from there on (:mod:`pipeline.data.epoch_stream`), so it takes
the same steps on the same batches as an uninterrupted run. An epoch ends for all ranks as soon as one rank's stream
runs out (ranks agree on it before every step), so every rank takes the same number of steps.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from pipeline.config import TrainJobConfig
from pipeline.data.streaming import DataInfo
from pipeline.errors import CheckpointError, DataError, FlowrailError, find_in_chain
from pipeline.train import loop as train_loop
from pipeline.train.checkpoint import TrainState
from pipeline.train.loop import (METRIC_SEND_INTERVAL_S, LoopContext, Stage, TooManyBadSteps,  # noqa: F401
                                 send_after_failure, send_due)


def _user_error(exc: BaseException) -> FlowrailError | None:
    """A :class:`FlowrailError` in the cause chain of ``exc`` (Ray Data wraps errors raised in its tasks)."""
    found = find_in_chain(exc, FlowrailError)
    if found is not None:
        return found
    for line in reversed(str(exc).splitlines()):  # Ray Data may only keep the remote traceback's text
        match = re.search(r"\b(DataError|CheckpointError|FlowrailError): (.+)$", line.strip())
        if match:
            return {"DataError": DataError, "CheckpointError": CheckpointError}.get(match.group(1), FlowrailError)(
                match.group(2))
    return None


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point: :func:`_train_loop`, then wait for metrics still being logged, also on failure."""
    from pipeline.train import user_errors

    def loop(config: dict[str, Any]) -> None:
        with ExitStack() as cleanups:  # background threads the loop started, stopped in reverse order
            _train_loop(config, cleanups)

    user_errors.run_recorded(loop, loop_config)


class EpochPrefetch:
    """Starts epoch ``e``'s batch stream on a background thread and pulls its first batch, so the stream's start-up
    overlaps the end of epoch ``e - 1``. The stream itself is the same deterministic one; only its start moves."""

    def __init__(self, epoch_batches: Callable[[int], Iterator[dict[str, torch.Tensor]]]) -> None:
        self._epoch_batches = epoch_batches
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flowrail-epoch-prefetch")
        self._pending: tuple[int, Future] | None = None

    def _first(self, epoch: int) -> tuple[Iterator[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]:
        batches = self._epoch_batches(epoch)
        return batches, next(batches, None)

    def start(self, epoch: int) -> None:
        if self._pending is None:
            self._pending = (epoch, self._pool.submit(self._first, epoch))

    def take(self, epoch: int) -> tuple[Iterator[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None] | None:
        """The started stream of ``epoch`` and its first batch (errors re-raised here), or None if not started."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != epoch:
            return None
        return pending[1].result()

    def close(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=False, cancel_futures=True)


def system_metrics_interval(cfg: TrainJobConfig, local_rank: int) -> float | None:
    """Seconds between this worker's system-metric samples (``log.system_metrics_interval_s``), or None when it takes
    none: one sampler per node (local rank 0), only with ``log.system_metrics``."""
    return cfg.log.system_metrics_interval_s if local_rank == 0 and cfg.log.system_metrics else None


def metric_logger_settings(cfg: TrainJobConfig) -> dict[str, Any]:
    """Rank 0's :class:`~pipeline.tracking.MetricLogger` settings: what an unreachable server does
    (``tracking.on_unreachable``) and how long the end of the run waits for it (``tracking.buffer_grace_s``)."""
    return {"policy": cfg.tracking.on_unreachable, "grace_s": cfg.tracking.buffer_grace_s}


def stream_settings(cfg: TrainJobConfig) -> dict[str, Any]:
    """The config's part of every rank's :func:`~pipeline.data.streaming.epoch_stream`: the bad-sample policy, the
    shuffle seed, the per-worker batch and the shuffle span."""
    return {"policy": cfg.data.bad_sample_policy, "seed": cfg.seed, "batch_size": cfg.data.batch_size,
            "shuffle_buffer": cfg.data.shuffle_buffer}


def start_worker(loop_config: dict[str, Any], cfg: TrainJobConfig, info: DataInfo, cleanups: ExitStack,
                 restore_extra: Callable[[Path], None] | None = None) -> LoopContext:
    """What every stage's worker does before its first step; ``restore_extra`` reads the stage's own files from
    the checkpoint it resumes from."""
    import ray.train

    from pipeline.tracking import MetricLogger
    from pipeline.train.fault_injection import hooks_from
    from pipeline.train.worker_setup import set_up_worker

    started_at = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not loop_config.get("verbose"):
        from pipeline.console import quiet_ray_logs

        quiet_ray_logs()
    interval_s = system_metrics_interval(cfg, ctx.get_local_rank())
    if interval_s is not None and loop_config.get("run_id"):
        from pipeline.system_metrics import start_system_metrics

        monitor = start_system_metrics(loop_config["tracking_uri"], loop_config["run_id"], ctx.get_node_rank(),
                                       interval_s)
        if monitor is not None:
            cleanups.callback(monitor.finish)
    if cfg.data.batch_size == "auto":  # probed on this worker's GPU, the same on every rank (train/batch_probe.py)
        from pipeline.train.batch_probe import resolve_auto_batch

        cfg.data.batch_size = resolve_auto_batch(cfg, info, rank)
    setup = set_up_worker(cfg, info, micro_batch=cfg.data.batch_size, world=world, rank=rank,
                          restore_extra=restore_extra)
    state = setup.state
    if setup.resumed:
        if rank == 0:
            print(f"[flowrail] resumed from step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})",
                  flush=True)
    else:
        torch.manual_seed(cfg.seed * 1009 + rank)  # per-rank noise/time draws
    logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"], **metric_logger_settings(cfg),
                          spool=loop_config.get("metric_spool")) \
        if rank == 0 and loop_config.get("run_id") else None
    if logger is not None and logger.recovered:
        print(f"[flowrail] {logger.recovered} metric values a previous attempt had not logged: sending them",
              flush=True)
    if logger is not None and setup.resumed:
        logger.record({"resumed_from_step": state.step}, step=state.step)  # sent with the first window's metrics
    if rank == 0:
        from pipeline.train.engine import global_batch

        tcfg = cfg.train
        samples_per_step = global_batch(tcfg, cfg.data.batch_size, world)
        print(f"[flowrail] global batch {samples_per_step} = data.batch_size {cfg.data.batch_size} x "
              f"train.grad_accum_steps {tcfg.grad_accum_steps} x {world} workers", flush=True)
        if logger is not None:
            logger.record({"global_batch": samples_per_step}, step=state.step)
    return LoopContext(cfg=cfg, info=info, setup=setup, rank=rank, world=world, loop_config=loop_config,
                       cleanups=cleanups, logger=logger, hooks=hooks_from(loop_config), started_at=started_at)


class SpineStage(Stage):
    """The spine's stage: this rank's deterministic stream of the run's shards, the objective's loss."""

    def __init__(self, ctx: LoopContext, paths: list[str]) -> None:
        from pipeline.data.read_budget import budget_from

        self.ctx, self.paths = ctx, paths
        self.cfg, self.info = ctx.cfg, ctx.info
        self.budget = budget_from(ctx.loop_config.get("read_budget"))  # this rank's Ray Data limits
        self.prefetch = EpochPrefetch(self._stream)
        ctx.cleanups.callback(self.prefetch.close)  # also on errors: the background stream must not outlive the loop
        # a quarter into an epoch, the next epoch's stream starts in the background: its Ray Data start-up (seconds
        # on a cluster; 0.2-0.3 s on the benchmark machine) would otherwise stall every rank at each epoch boundary,
        # and a small set like digits has ~10-30 batches per epoch (started half-way, a 256-batch epoch still
        # waited 40 ms)
        self.prefetch_at = max(1, self.info.num_samples // max(ctx.world * self.cfg.data.batch_size, 1) // 4)
        from pipeline.train.init_from import inherited_privacy

        # a privacy-stage ancestor: its checkpoints keep the marker
        self.lineage = inherited_privacy(self.cfg) if ctx.rank == 0 else {}

    def _stream(self, epoch: int, start: Any = None) -> Iterator[dict[str, Any]]:
        """This rank's batches of ``epoch`` from ``start`` (deterministic), each with its stream position under
        ``"position"``; read errors become one line naming the shard."""
        from pipeline.data.pixels import model_batch
        from pipeline.data.streaming import epoch_stream, name_bad_shard

        cfg, ctx = self.cfg, self.ctx
        stream, files = epoch_stream(self.paths, self.info, **stream_settings(cfg), epoch=epoch, rank=ctx.rank,
                                     world=ctx.world, start=start, budget=self.budget)
        while True:
            try:
                batch, position = next(stream)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - Ray Data wraps read/decode errors of its tasks
                raise (_user_error(exc) or name_bad_shard(files, exc)) from None
            tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
            # uint8 pixels crossed the object store; floats from here on
            yield {**model_batch(tensors, self.info), "position": position}

    def epoch_batches(self, state: TrainState) -> Iterator[dict[str, Any]]:
        """The prefetched stream at an epoch's start; on resume the stream from this rank's saved position, reading
        only the files from there on (a checkpoint without a position: the consumed batches are skipped)."""
        from pipeline.data.epoch_stream import StreamPosition

        consumed = state.batch_in_epoch
        started = self.prefetch.take(state.epoch) if consumed == 0 else None
        if started is not None:
            batches, first = started
            if first is None:
                return
            yield first
            yield from batches
            return
        position = StreamPosition(*state.data_position) if consumed and state.data_position else None
        batches = self._stream(state.epoch, position)
        for _ in range(0 if position else consumed):
            next(batches, None)
        yield from batches

    def take(self, state: TrainState, batch: dict[str, Any]) -> dict[str, Any]:
        state.data_position = list(batch.pop("position"))
        if state.batch_in_epoch == self.prefetch_at:
            self.prefetch.start(state.epoch + 1)
        return _to_device(batch, self.ctx.setup.device)

    def loss(self, engine: Any, batch: dict[str, Any]) -> torch.Tensor:
        return self.ctx.setup.objective.loss(engine, batch)

    def samples(self, batch: dict[str, Any]) -> int:
        return batch["image"].shape[0] if "image" in batch else self.cfg.data.batch_size

    def window_values(self) -> dict[str, float]:
        """The objective's own window sums (a flow map's unweighted errors), when it keeps any."""
        own = getattr(self.ctx.setup.objective, "window_values", None)
        return own() if own is not None else {}

    def window_metrics(self, summed: dict[str, float], world: int) -> dict[str, float]:
        own = getattr(self.ctx.setup.objective, "window_metrics", None)
        return own(summed) if own is not None and summed else {}

    def end_epoch(self, state: TrainState, consumed_before: int) -> None:
        if state.batch_in_epoch == consumed_before == 0:
            raise DataError(f"an epoch of {self.cfg.data.shards} gave worker {self.ctx.rank} no full batch of "
                            f"{self.cfg.data.batch_size} samples (too few valid samples for data.batch_size)")
        super().end_epoch(state, consumed_before)

    def checkpoint_extra(self) -> dict[str, Any]:
        return dict(self.lineage)


def _train_loop(loop_config: dict[str, Any], cleanups: ExitStack) -> None:
    """The spine's worker: :func:`start_worker`, then the one loop over :class:`SpineStage`."""
    cfg = TrainJobConfig.model_validate(loop_config["cfg"])
    ctx = start_worker(loop_config, cfg, DataInfo(**loop_config["data"]), cleanups)
    train_loop.run(ctx, SpineStage(ctx, loop_config["paths"]))
