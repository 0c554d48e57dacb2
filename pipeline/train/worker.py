"""The Ray Train worker loop: the only place that knows it runs distributed.

Per step: batch from this worker's deterministic stream (:func:`pipeline.data.streaming.epoch_dataset`) →
objective loss → DeepSpeed backward/step → EMA update. Every ``log_every`` steps the ranks agree on the mean loss
and rank 0 logs it; every ``checkpoint_every`` steps (and at the end) every rank writes its part of a checkpoint
and reports it to Ray Train.

Resume: a restarted worker group (``train.max_failures``) or a re-run restores model, optimizer, EMA, RNG and the
data position (epoch, batches consumed in it, this rank's stream position) from the latest checkpoint and starts
its stream at that position, reading only the files from there on (:mod:`pipeline.data.epoch_stream`), so it takes
the same steps on the same batches as an uninterrupted run. An epoch ends for all ranks as soon as one rank's stream
runs out (ranks agree on it before every step), so every rank takes the same number of steps.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
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
from pipeline.train import checkpoint as ckpt_io
from pipeline.train import periodic_eval
from pipeline.train.collectives import all_reduce_sum, step_flags
from pipeline.train.reporting import MetricReporter


# Recorded windows reach MLflow at most this often (the last at once). A send costs the worker milliseconds of CPU
# (an sqlite store ~7 ms, mostly holding the GIL): sent every window of a fast loop (log_every=20 at 2 ms a step,
# 25 sends a second) it took 0.33 ms of every step from the loop's thread (benchmarks/RESULTS.md, host overhead).
METRIC_SEND_INTERVAL_S = 1.0


def send_due(previous: Future | None, final: bool, sent_at: float, now: float) -> bool:
    """Whether the loop hands the recorded metrics to the send thread now: the previous send is done, and
    :data:`METRIC_SEND_INTERVAL_S` has passed since it was handed over (the run's last window at once)."""
    return (previous is None or previous.done()) and (final or now - sent_at >= METRIC_SEND_INTERVAL_S)


def send_after_failure(logger: Any) -> None:
    """A failing loop's last act: one attempt to send the windows recorded but not yet sent (at most
    :data:`METRIC_SEND_INTERVAL_S` of them), so the failed run shows its metrics up to the failure. It never raises
    over the loop's own error; what it cannot send stays in the run's spool for a restart or re-run. After a failed
    send it does not try (MLflow's HTTP retries would hold the failing worker for minutes)."""
    if logger.failures:
        return
    try:
        logger.flush()
    except Exception:  # noqa: BLE001 - the tracking server is unreachable too; the spool keeps the metrics
        pass


class TooManyBadSteps(FlowrailError):
    """The loss was NaN/Inf more often than ``train.max_bad_steps`` allows."""


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


class FaultInjection:
    """Deliberate faults for reliability tests, from ``$FLOWRAIL_FAULT_INJECT`` on the driver.

    ``kill@R:S``: rank R SIGKILLs its own process right after step S, once per run (a marker file in ``marker_dir``
    stops the restarted worker from doing it again). Before killing it waits until Ray Train has registered the
    last checkpoint (``checkpoint_manager_snapshot.json`` in ``run_storage``): the controller collects reports by
    polling, and a checkpoint reported moments before a crash may never be registered (the restart then resumes
    from the one before). ``killdriver@R:S``: the same, but rank R SIGKILLs the driver process (a re-run must pick
    the run up). ``nan@R:B``: rank R's loss is NaN on its B-th batch (counted as steps + skipped steps, so it fires
    once). Comma-separated for several.
    """

    def __init__(self, spec: str | None, marker_dir: str | None, run_storage: str | None = None,
                 driver_pid: int | None = None) -> None:
        self.faults: list[tuple[str, int, int]] = []
        self.marker_dir = Path(marker_dir) if marker_dir else None
        self.run_storage = Path(run_storage) if run_storage else None
        self.driver_pid = driver_pid  # ``killdriver@R:S``: rank R SIGKILLs the driver instead of itself
        for part in filter(None, (spec or "").split(",")):
            kind, _, where = part.strip().partition("@")
            rank, _, index = where.partition(":")
            self.faults.append((kind, int(rank), int(index)))

    def nan_loss(self, rank: int, batch_index: int) -> bool:
        return ("nan", rank, batch_index) in self.faults

    def _registered_step(self) -> int:
        if self.run_storage is None:
            return -1
        names = ckpt_io.registered_checkpoints(self.run_storage) or set()
        steps = [ckpt_io.read_meta(self.run_storage / n)["step"] for n in names
                 if (self.run_storage / n / ckpt_io.META).is_file()]
        return max(steps, default=-1)

    def maybe_kill(self, rank: int, step: int, last_checkpoint_step: int) -> None:
        if ("killdriver", rank, step) in self.faults and self.driver_pid and self.marker_dir is not None:
            self._kill("killdriver", rank, step, last_checkpoint_step, self.driver_pid)
        if ("kill", rank, step) in self.faults and self.marker_dir is not None:
            self._kill("kill", rank, step, last_checkpoint_step, os.getpid())

    def _kill(self, kind: str, rank: int, step: int, last_checkpoint_step: int, pid: int) -> None:
        assert self.marker_dir is not None
        marker = self.marker_dir / f".fault-{kind}-r{rank}-s{step}"
        if marker.exists():
            return
        deadline = time.monotonic() + 300
        while self._registered_step() < last_checkpoint_step and time.monotonic() < deadline:
            time.sleep(0.5)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(pid))
        who = "the driver" if kind == "killdriver" else f"rank {rank}"
        print(f"[flowrail] fault injection: SIGKILL {who} (pid {pid}) after step {step}", flush=True)
        os.kill(pid, signal.SIGKILL)


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


def _train_loop(loop_config: dict[str, Any], cleanups: ExitStack) -> None:
    import ray.train

    from pipeline.data.epoch_stream import StreamPosition
    from pipeline.data.pixels import model_batch
    from pipeline.data.read_budget import budget_from
    from pipeline.data.streaming import epoch_stream, name_bad_shard
    from pipeline.tracking import MetricLogger
    from pipeline.train.worker_setup import set_up_worker

    cfg = TrainJobConfig.model_validate(loop_config["cfg"])
    info = DataInfo(**loop_config["data"])
    paths: list[str] = loop_config["paths"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    verbose = bool(loop_config.get("verbose"))
    if not verbose:
        from pipeline.console import quiet_ray_logs

        quiet_ray_logs()
    if ctx.get_local_rank() == 0 and loop_config.get("run_id") and cfg.log.system_metrics:
        from pipeline.system_metrics import start_system_metrics

        monitor = start_system_metrics(loop_config["tracking_uri"], loop_config["run_id"], ctx.get_node_rank(),
                                       cfg.log.system_metrics_interval_s)
        if monitor is not None:
            cleanups.callback(monitor.finish)
    tcfg = cfg.train
    faults = FaultInjection(loop_config.get("fault_injection"), loop_config.get("fault_marker_dir"),
                            loop_config.get("fault_run_storage"), loop_config.get("fault_driver_pid"))

    if cfg.data.batch_size == "auto":  # probed on this worker's GPU, the same on every rank (train/batch_probe.py)
        from pipeline.train.batch_probe import resolve_auto_batch

        cfg.data.batch_size = resolve_auto_batch(cfg, info, rank)
    setup = set_up_worker(cfg, info, micro_batch=cfg.data.batch_size, world=world, rank=rank)
    engine, ema, objective, device, autocast, state = (setup.engine, setup.ema, setup.objective, setup.device,
                                                       setup.autocast, setup.state)
    if setup.resumed:
        if rank == 0:
            print(f"[flowrail] resumed from step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})",
                  flush=True)
    else:
        torch.manual_seed(cfg.seed * 1009 + rank)  # per-rank noise/time draws

    logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"], cfg.tracking.on_unreachable,
                          grace_s=cfg.tracking.buffer_grace_s, spool=loop_config.get("metric_spool")) \
        if rank == 0 and loop_config.get("run_id") else None
    if logger is not None and logger.recovered:
        print(f"[flowrail] {logger.recovered} metric values a previous attempt had not logged: sending them",
              flush=True)
    if logger is not None and setup.resumed:
        logger.record({"resumed_from_step": state.step}, step=state.step)  # sent with the first window's metrics
    if rank == 0:
        from pipeline.train.engine import global_batch

        samples_per_step = global_batch(tcfg, cfg.data.batch_size, world)
        print(f"[flowrail] global batch {samples_per_step} = data.batch_size {cfg.data.batch_size} x "
              f"train.grad_accum_steps {tcfg.grad_accum_steps} x {world} workers", flush=True)
        if logger is not None:
            logger.record({"global_batch": samples_per_step}, step=state.step)
    window = {"loss": 0.0, "n": 0, "samples": 0, "skipped": 0, "t0": time.perf_counter(), "wait": 0.0}
    from pipeline.train.init_from import inherited_privacy

    lineage = inherited_privacy(cfg) if rank == 0 else {}  # a privacy-stage ancestor: its checkpoints keep the marker

    def checkpoint_and_report(metrics: dict[str, float]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"flowrail-ckpt-r{rank}-"))
        try:
            ckpt_io.save(tmp, engine=engine, ema=ema, state=state, cfg=cfg, info=info, rank=rank, world=world,
                         extra={"mlflow_run_id": loop_config.get("run_id"), **lineage})
            try:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
            except Exception as exc:  # noqa: BLE001 - Ray's upload to the run's storage; a full one is a user error
                full = ckpt_io.disk_full_error(exc)
                if full is None:
                    raise
                raise CheckpointError(f"could not store the checkpoint of step {state.step} in "
                                      f"{loop_config.get('checkpoint_storage', 'the run storage')}: no space left on "
                                      f"device; the previous checkpoint is kept") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    budget = budget_from(loop_config.get("read_budget"))  # this rank's Ray Data limits (pipeline/data/read_budget.py)

    def epoch_batches(epoch: int, start: StreamPosition | None = None):
        """This rank's batches of ``epoch`` from ``start`` (deterministic), each with its stream position under
        ``"position"``; read errors become one line naming the shard."""
        stream, files = epoch_stream(paths, info, policy=cfg.data.bad_sample_policy, seed=cfg.seed, epoch=epoch,
                                     rank=rank, world=world, batch_size=cfg.data.batch_size,
                                     shuffle_buffer=cfg.data.shuffle_buffer, start=start, budget=budget)
        while True:
            try:
                batch, position = next(stream)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - Ray Data wraps read/decode errors of its tasks
                raise (_user_error(exc) or name_bad_shard(files, exc)) from None
            tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
            # uint8 pixels crossed the object store; floats from here on
            yield {**model_batch(tensors, info), "position": position}

    # Per step one host sync (the NaN-guard flag) and one collective: the agreement on "this loss is finite" and
    # on "every rank has a next batch" travel together, the next batch being fetched before that agreement.
    # The window's loss stays on the device until a log step; MLflow logging runs on a background thread.
    if logger is not None:  # registered before the send thread's shutdown, so it runs after that on the way out
        cleanups.push(lambda exc_type, *_: send_after_failure(logger) if exc_type is not None else None)
    log_thread = ThreadPoolExecutor(1, thread_name_prefix="flowrail-mlflow") if logger is not None else None
    if log_thread is not None:
        cleanups.callback(log_thread.shutdown, wait=True)
    logged: Future | None = None
    sent_at = -float("inf")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    start_step = state.step
    prefetch = EpochPrefetch(epoch_batches)
    cleanups.callback(prefetch.close)  # also on errors: the background stream must not outlive the loop
    reporter = MetricReporter()  # metric-only reports to Ray Train off the loop's thread (pipeline/train/reporting.py)
    cleanups.callback(reporter.close)
    # a quarter into an epoch, the next epoch's stream starts in the background: its Ray Data start-up (seconds on a
    # cluster; 0.2-0.3 s on the benchmark machine) would otherwise stall every rank at each epoch boundary, and a
    # small set like digits has ~10-30 batches per epoch (started half-way, a 256-batch epoch still waited 40 ms)
    prefetch_at = max(1, info.num_samples // max(world * cfg.data.batch_size, 1) // 4)
    while state.step < tcfg.steps:
        t_wait = time.perf_counter()
        consumed_before = state.batch_in_epoch
        started = prefetch.take(state.epoch) if consumed_before == 0 else None
        if started is not None:
            batches, batch = started
        else:  # resume: the stream starts at this rank's saved position, reading only the files from there on
            position = StreamPosition(*state.data_position) if consumed_before and state.data_position else None
            batches = epoch_batches(state.epoch, position)
            for _ in range(0 if position else consumed_before):  # a checkpoint without a position: skip batches
                next(batches, None)
            batch = next(batches, None)
        window["wait"] += time.perf_counter() - t_wait
        ended = all_reduce_sum([float(batch is None)])[0] > 0  # one rank ran out: the epoch ends for all
        while not ended:
            state.batch_in_epoch += 1
            state.data_position = list(batch.pop("position"))
            if state.batch_in_epoch == prefetch_at:
                prefetch.start(state.epoch + 1)
            window["skipped"] += int(batch.pop("skipped").sum()) if "skipped" in batch else 0
            batch = _to_device(batch, device)
            with autocast:
                loss = objective.loss(engine, batch)
            if faults.nan_loss(rank, state.step + state.bad_steps):
                loss = loss * float("nan")
            t_wait = time.perf_counter()
            upcoming = next(batches, None)  # host work while an accelerator still runs the forward pass
            window["wait"] += time.perf_counter() - t_wait
            nonfinite, ended = step_flags(loss, upcoming is None)  # the epoch ends for all if one rank ran out
            if nonfinite:  # every rank skips together, or none does
                state.bad_steps += 1
                if tcfg.grad_accum_steps == 1:  # mid-window the good micro-batches' gradients are kept
                    engine.zero_grad() if hasattr(engine, "zero_grad") else None
                if rank == 0:
                    print(f"[flowrail] non-finite loss at step {state.step + 1}: skipped "
                          f"({state.bad_steps}/{tcfg.max_bad_steps} allowed)", flush=True)
                if state.bad_steps > tcfg.max_bad_steps:
                    raise TooManyBadSteps(f"loss was NaN/Inf in {state.bad_steps} steps "
                                          f"(train.max_bad_steps={tcfg.max_bad_steps}); last good step {state.step}")
                batch = upcoming
                continue
            engine.backward(loss)  # DeepSpeed scales it by 1 / grad_accum_steps
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()  # the optimizer steps at the window's last micro-batch only
            loss_sum += loss.detach()
            window["n"] += 1
            window["samples"] += batch["image"].shape[0] if "image" in batch else cfg.data.batch_size
            if not boundary:  # the accumulation window goes on (across an epoch end too): no step counted
                batch = upcoming
                continue
            ema.update(engine.module, ema.decay_at(state.step))
            state.step += 1

            last = state.step >= tcfg.steps
            if state.step % tcfg.log_every == 0 or last or state.step % tcfg.checkpoint_every == 0:
                window["loss"] = float(loss_sum)
                loss_sum.zero_()
                loss_total, n, samples, skipped, idle = all_reduce_sum(
                    [window["loss"], window["n"], window["samples"], window["skipped"], float(reporter.idle())])
                state.skipped_samples += int(skipped)
                elapsed = time.perf_counter() - window["t0"]
                metrics = {"loss": loss_total / max(n, 1), "samples_per_s": samples / max(elapsed, 1e-9),
                           "data_wait_fraction": window["wait"] / max(elapsed, 1e-9),
                           "lr": engine.get_lr()[0] if hasattr(engine, "get_lr") else tcfg.lr,
                           "bad_steps": state.bad_steps, "skipped_samples": state.skipped_samples,
                           "epoch": state.epoch, "step": state.step}
                if periodic_eval.due(state.step, tcfg.eval_every, last):
                    ema_model = ema.model  # under ZeRO-3 a gather: every rank takes part, rank 0 evaluates
                    if rank == 0:
                        metrics.update(periodic_eval.evaluate_ema(cfg, ema_model, objective, info, state.step))
                    del ema_model
                if logger is not None and log_thread is not None:
                    # recorded (memory + the run's spool file) now; sent on the background thread, which may be
                    # waiting out MLflow's retries: training does not wait for it, the next send takes all pending
                    logger.record({k: v for k, v in metrics.items() if k != "step"}, state.step)
                    if send_due(logged, last, sent_at, time.monotonic()):
                        if logged is not None:
                            logged.result()  # the previous send: surfaces a TrackingError (on_unreachable=fail)
                        logged, sent_at = log_thread.submit(logger.flush), time.monotonic()
                    if verbose:  # the driver's progress bar shows the same, from this report
                        done = state.step - start_step
                        eta = elapsed / max(window["n"], 1) * tcfg.grad_accum_steps * (tcfg.steps - state.step)
                        print(f"[flowrail] step {state.step}/{tcfg.steps}  loss {metrics['loss']:.4f}  "
                              f"{metrics['samples_per_s']:.0f} samples/s  eta {eta:.0f}s  ({done} this attempt)",
                              flush=True)
                window.update(loss=0.0, n=0, samples=0, skipped=0, t0=time.perf_counter(), wait=0.0)
                if state.step % tcfg.checkpoint_every == 0 or last:
                    reporter.drain()  # reports keep their order
                    checkpoint_and_report(metrics)
                elif idle >= world:  # every rank's previous report is through: all report this window, or none
                    reporter.submit(metrics)
            faults.maybe_kill(rank, state.step, state.step // tcfg.checkpoint_every * tcfg.checkpoint_every)
            if last:
                break
            batch = upcoming
        if state.step >= tcfg.steps:
            break
        if state.batch_in_epoch == consumed_before == 0:
            raise DataError(f"an epoch of {cfg.data.shards} gave worker {rank} no full batch of "
                            f"{cfg.data.batch_size} samples (too few valid samples for data.batch_size)")
        state.epoch += 1
        state.batch_in_epoch = 0
        state.data_position = None
    if log_thread is not None:
        if logged is not None:
            logged.result()
        log_thread.shutdown(wait=True)
    if logger is not None and not logger.flush(final=True):
        print(f"[flowrail] {len(logger.pending)} metrics could not be logged: tracking server unreachable", flush=True)
