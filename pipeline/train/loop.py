"""The one training loop every stage runs: the spine (:mod:`pipeline.train.worker`) and the privacy stage.

Per micro-batch: next batch (the stage's source) → at a step's first micro-batch, the stage's refresh hook →
loss (the stage's objective) → one agreement of all ranks on "finite loss, every rank has a next batch" → backward
and step (DeepSpeed accumulates ``train.grad_accum_steps`` micro-batches) → at the window's boundary the EMA update
and ``step += 1`` → every ``log_every`` steps the window's metrics (recorded to the run's spool, sent in the
background) → periodic evaluation → checkpoint (one call into :mod:`pipeline.train.checkpoint`).

What differs between stages is a :class:`Stage` (as torchtitan's train specs plug a model and a loss into one
trainer): its batch source, its refresh hook, its loss and its own window metrics. Test-only faults are
:class:`LoopHooks` installed from the loop's config (:mod:`pipeline.train.fault_injection`), not part of it.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import TrainJobConfig
from pipeline.data.streaming import DataInfo
from pipeline.errors import CheckpointError, FlowrailError
from pipeline.train import checkpoint as ckpt_io
from pipeline.train import periodic_eval
from pipeline.train.checkpoint import TrainState
from pipeline.train.collectives import all_reduce_sum, step_flags
from pipeline.train.reporting import MetricReporter

# Recorded windows reach MLflow at most this often (the last at once). A send costs the worker milliseconds of CPU
# (an sqlite store ~7 ms, mostly holding the GIL): sent every window of a fast loop (log_every=20 at 2 ms a step,
# 25 sends a second) it took 0.33 ms of every step from the loop's thread (benchmarks/RESULTS.md, host overhead).
METRIC_SEND_INTERVAL_S = 1.0


class TooManyBadSteps(FlowrailError):
    """The loss was NaN/Inf more often than ``train.max_bad_steps`` allows."""


class Stage:
    """What a training stage plugs into the loop. The defaults are the spine's; subclasses override."""

    def epoch_batches(self, state: TrainState) -> Iterator[dict[str, Any]]:
        """This rank's batches of ``state.epoch`` from the state's data position (an epoch ends when it is empty)."""
        raise NotImplementedError

    def take(self, state: TrainState, batch: dict[str, Any]) -> dict[str, Any]:
        """Book-keeping of a consumed batch (``state.batch_in_epoch`` is already counted); the batch for the loss."""
        return batch

    def before_step(self, state: TrainState) -> None:
        """Before the first micro-batch of step ``state.step`` (the privacy stage refreshes its pool here)."""

    def loss(self, engine: Any, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def samples(self, batch: dict[str, Any]) -> int:
        """Samples that went through this micro-batch's backward pass."""
        raise NotImplementedError

    def window_values(self) -> dict[str, float]:
        """This rank's values summed over the ranks with each window's metrics."""
        return {}

    def window_metrics(self, summed: dict[str, float], world: int) -> dict[str, float]:
        """The stage's own metrics of a window from its summed values."""
        return {}

    def end_epoch(self, state: TrainState, consumed_before: int) -> None:
        state.epoch += 1
        state.batch_in_epoch = 0
        state.data_position = None

    def checkpoint_extra(self) -> dict[str, Any]:
        """Entries for the checkpoint's ``flowrail.json``."""
        return {}

    def save_files(self, local_dir: Path, rank: int) -> None:
        """Stage state this rank adds to its part of a checkpoint (restored through ``set_up_worker``)."""


class LoopHooks:
    """Points where tests change the loop's behaviour; the production loop runs these no-ops."""

    def on_loss(self, rank: int, batch_index: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def after_step(self, rank: int, step: int, last_checkpoint_step: int) -> None:
        pass


@dataclass
class LoopContext:
    """Everything the loop needs that the worker's set-up built."""

    cfg: TrainJobConfig
    info: DataInfo
    setup: Any  # pipeline.train.worker_setup.WorkerSetup
    rank: int
    world: int
    loop_config: dict[str, Any]
    cleanups: ExitStack
    logger: Any = None  # pipeline.tracking.MetricLogger on rank 0 of a tracked run
    hooks: LoopHooks = field(default_factory=LoopHooks)
    started_at: float = field(default_factory=time.perf_counter)  # the worker's start: start-up cost is from here
    startup_s: float | None = None  # worker start -> first optimizer step, set by :func:`mark_started`
    first_window_step: int | None = None  # the step whose window records ``startup_s``

    @property
    def state(self) -> TrainState:
        return self.setup.state


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


class Window:
    """The metrics of the steps since the last log step: loss summed on the device (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.n, self.samples, self.skipped, self.wait, self.t0 = 0, 0, 0, 0.0, time.perf_counter()

    def next(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """The next batch, its wait counted as data wait."""
        t = time.perf_counter()
        batch = next(batches, None)
        self.wait += time.perf_counter() - t
        return batch

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum += loss.detach()
        self.n += 1
        self.samples += samples

    def close(self, ctx: LoopContext, stage: Stage, reporter_idle: bool) -> tuple[dict[str, float], float]:
        """The window's metrics agreed by all ranks (one all-reduce), and how many ranks' reporters are idle."""
        state, tcfg, engine = ctx.state, ctx.cfg.train, ctx.setup.engine
        own = stage.window_values()
        values = all_reduce_sum([float(self.loss_sum), self.n, self.samples, self.skipped, float(reporter_idle),
                                 *own.values()])
        self.loss_sum.zero_()
        loss_total, n, samples, skipped, idle = values[:5]
        state.skipped_samples += int(skipped)
        elapsed = time.perf_counter() - self.t0
        metrics = {"loss": loss_total / max(n, 1), "samples_per_s": samples / max(elapsed, 1e-9),
                   "data_wait_fraction": self.wait / max(elapsed, 1e-9),
                   "lr": engine.get_lr()[0] if hasattr(engine, "get_lr") else tcfg.lr,
                   "bad_steps": state.bad_steps, "skipped_samples": state.skipped_samples,
                   "epoch": state.epoch, "step": state.step,
                   **stage.window_metrics(dict(zip(own, values[5:])), ctx.world)}
        self.elapsed, self.steps_n = elapsed, n
        return metrics, idle


def guard_nonfinite(ctx: LoopContext) -> None:
    """A NaN/Inf loss on some rank: every rank skips the micro-batch; too many raise :class:`TooManyBadSteps`."""
    state, tcfg, engine = ctx.state, ctx.cfg.train, ctx.setup.engine
    state.bad_steps += 1
    if tcfg.grad_accum_steps == 1:  # mid-window the good micro-batches' gradients are kept
        engine.zero_grad() if hasattr(engine, "zero_grad") else None
    if ctx.rank == 0:
        print(f"[flowrail] non-finite loss at step {state.step + 1}: skipped "
              f"({state.bad_steps}/{tcfg.max_bad_steps} allowed)", flush=True)
    if state.bad_steps > tcfg.max_bad_steps:
        raise TooManyBadSteps(f"loss was NaN/Inf in {state.bad_steps} steps "
                              f"(train.max_bad_steps={tcfg.max_bad_steps}); last good step {state.step}")


def train_step(ctx: LoopContext, loss: torch.Tensor) -> bool:
    """Backward and optimizer step of one micro-batch; True at an accumulation boundary (EMA updated, step
    counted). DeepSpeed scales the loss by ``1 / grad_accum_steps`` and steps at the window's last micro-batch."""
    engine, ema, state = ctx.setup.engine, ctx.setup.ema, ctx.state
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    if boundary:
        ema.update(engine.module, ema.decay_at(state.step))
        state.step += 1
    return boundary


class MetricSink:
    """Rank 0's metric windows: recorded (memory + the run's spool) on the loop's thread, sent to MLflow on a
    background thread at most every :data:`METRIC_SEND_INTERVAL_S`; the verbose console line."""

    def __init__(self, ctx: LoopContext) -> None:
        self.ctx, self.logger = ctx, ctx.logger
        self.thread: ThreadPoolExecutor | None = None
        self.sending: Future | None = None
        self.sent_at = -float("inf")
        self.start_step = ctx.state.step
        if self.logger is not None:  # registered before the thread's shutdown, so it runs after that on the way out
            ctx.cleanups.push(lambda exc_type, *_: send_after_failure(self.logger) if exc_type is not None else None)
            self.thread = ThreadPoolExecutor(1, thread_name_prefix="flowrail-mlflow")
            ctx.cleanups.callback(self.thread.shutdown, wait=True)

    def record(self, metrics: dict[str, float], window: Window, last: bool) -> None:
        if self.logger is None or self.thread is None:
            return
        state, tcfg = self.ctx.state, self.ctx.cfg.train
        # recorded now; sent on the background thread, which may be waiting out MLflow's retries: training does not
        # wait for it, the next send takes all pending
        self.logger.record({k: v for k, v in metrics.items() if k != "step"}, state.step)
        if send_due(self.sending, last, self.sent_at, time.monotonic()):
            if self.sending is not None:
                self.sending.result()  # the previous send: surfaces a TrackingError (on_unreachable=fail)
            self.sending, self.sent_at = self.thread.submit(self.logger.flush), time.monotonic()
        if self.ctx.loop_config.get("verbose"):  # the driver's progress bar shows the same, from the report
            eta = window.elapsed / max(window.steps_n, 1) * tcfg.grad_accum_steps * (tcfg.steps - state.step)
            print(f"[flowrail] step {state.step}/{tcfg.steps}  loss {metrics['loss']:.4f}  "
                  f"{metrics['samples_per_s']:.0f} samples/s  eta {eta:.0f}s  ({state.step - self.start_step} "
                  f"this attempt)", flush=True)

    def finish(self) -> None:
        if self.thread is not None:
            if self.sending is not None:
                self.sending.result()
            self.thread.shutdown(wait=True)
        if self.logger is not None and not self.logger.flush(final=True):
            print(f"[flowrail] {len(self.logger.pending)} metrics could not be logged: tracking server unreachable",
                  flush=True)


def checkpoint_and_report(ctx: LoopContext, stage: Stage, metrics: dict[str, float]) -> None:
    """This rank's part of a checkpoint (:func:`pipeline.train.checkpoint.save` + the stage's files), reported to
    Ray Train with ``metrics``; a full run storage is one line."""
    import ray.train

    s, rank = ctx.setup, ctx.rank
    tmp = Path(tempfile.mkdtemp(prefix=f"flowrail-ckpt-r{rank}-"))
    try:
        ckpt_io.save(tmp, engine=s.engine, ema=s.ema, state=s.state, cfg=ctx.cfg, info=ctx.info, rank=rank,
                     world=ctx.world, extra={"mlflow_run_id": ctx.loop_config.get("run_id"),
                                             **stage.checkpoint_extra()})
        stage.save_files(tmp, rank)
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        except Exception as exc:  # noqa: BLE001 - Ray's upload to the run's storage; a full one is a user error
            if ckpt_io.disk_full_error(exc) is None:
                raise
            raise CheckpointError(f"could not store the checkpoint of step {s.state.step} in "
                                  f"{ctx.loop_config.get('checkpoint_storage', 'the run storage')}: no space left on "
                                  f"device; the previous checkpoint is kept") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def step_events(tcfg: Any, step: int) -> frozenset[str]:
    """What the loop does after optimizer step ``step`` of ``train.steps``: ``window`` (the metrics since the last
    window: every ``log_every`` and ``checkpoint_every`` steps and at the last), ``eval`` (every ``eval_every``
    steps and at the last, 0: never; inside a window), ``checkpoint`` (every ``checkpoint_every`` and at the last),
    ``last``."""
    last = step >= tcfg.steps
    events = {"last"} if last else set()
    if step % tcfg.log_every == 0 or last or step % tcfg.checkpoint_every == 0:
        events.add("window")
        if periodic_eval.due(step, tcfg.eval_every, last):
            events.add("eval")
    if step % tcfg.checkpoint_every == 0 or last:
        events.add("checkpoint")
    return frozenset(events)


def end_window(ctx: LoopContext, stage: Stage, window: Window, sink: MetricSink, reporter: MetricReporter,
               last: bool) -> None:
    """A log / checkpoint step: the window's metrics, periodic evaluation, recording, then checkpoint or report."""
    state, tcfg = ctx.state, ctx.cfg.train
    metrics, idle = window.close(ctx, stage, reporter.idle())
    if state.step == ctx.first_window_step and ctx.startup_s is not None:
        metrics["startup_s"] = ctx.startup_s
    events = step_events(tcfg, state.step)
    if "eval" in events:
        ema_model = ctx.setup.ema.model  # under ZeRO-3 a gather: every rank takes part, rank 0 evaluates
        if ctx.rank == 0:
            metrics.update(periodic_eval.evaluate_ema(ctx.cfg, ema_model, ctx.setup.objective, ctx.info, state.step))
        del ema_model
    sink.record(metrics, window, last)
    window.reset()
    if "checkpoint" in events:
        reporter.drain()  # reports keep their order
        checkpoint_and_report(ctx, stage, metrics)
    elif idle >= ctx.world:  # every rank's previous report is through: all report this window, or none
        reporter.submit(metrics)


def mark_started(ctx: LoopContext) -> None:
    """The loop's start-up cost, from the worker's start to its first optimizer step (rank 0 prints it; the first
    window records it as ``startup_s``)."""
    seconds = time.perf_counter() - ctx.started_at
    tcfg = ctx.cfg.train
    ctx.startup_s = seconds
    ctx.first_window_step = next(s for s in range(ctx.state.step, tcfg.steps + 1) if "window" in step_events(tcfg, s))
    if ctx.rank == 0:
        print(f"[flowrail] first step after {seconds:.2f}s of start-up", flush=True)


def run(ctx: LoopContext, stage: Stage) -> None:
    """Train ``ctx``'s engine on ``stage`` from ``ctx.state`` to ``train.steps``."""
    state, tcfg, rank = ctx.state, ctx.cfg.train, ctx.rank
    window = Window(ctx.setup.device)
    sink = MetricSink(ctx)
    reporter = MetricReporter()  # metric-only reports to Ray Train off the loop's thread (reporting.py)
    ctx.cleanups.callback(reporter.close)
    new_step = True  # the next micro-batch starts an optimizer step (the stage's refresh hook runs first)
    started = False
    while state.step < tcfg.steps:
        consumed_before = state.batch_in_epoch
        batches = stage.epoch_batches(state)
        batch = window.next(batches)
        ended = all_reduce_sum([float(batch is None)])[0] > 0  # one rank ran out: the epoch ends for all
        while not ended:
            state.batch_in_epoch += 1
            window.skipped += int(batch.pop("skipped").sum()) if "skipped" in batch else 0
            batch = stage.take(state, batch)
            if new_step:
                stage.before_step(state)
            with ctx.setup.autocast:
                loss = stage.loss(ctx.setup.engine, batch)
            loss = ctx.hooks.on_loss(rank, state.step + state.bad_steps, loss)
            upcoming = window.next(batches)  # host work while an accelerator still runs the forward pass
            nonfinite, ended = step_flags(loss, upcoming is None)  # the epoch ends for all if one rank ran out
            if nonfinite:  # every rank skips together, or none does
                guard_nonfinite(ctx)
                new_step, batch = False, upcoming
                continue
            new_step = train_step(ctx, loss)
            window.add(loss, stage.samples(batch))
            if not new_step:  # the accumulation window goes on (across an epoch end too): no step counted
                batch = upcoming
                continue
            if not started:
                mark_started(ctx)
                started = True
            events = step_events(tcfg, state.step)
            last = "last" in events
            if "window" in events:
                end_window(ctx, stage, window, sink, reporter, last)
            ctx.hooks.after_step(rank, state.step, state.step // tcfg.checkpoint_every * tcfg.checkpoint_every)
            if last:
                break
            batch = upcoming
        if state.step >= tcfg.steps:
            break
        stage.end_epoch(state, consumed_before)
    sink.finish()
