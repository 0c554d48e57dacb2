"""What a person sees while a job runs: one progress bar on the driver, Ray's per-dataset and per-report chatter off.

Quiet by default, everything back with ``log.verbose=true`` or ``flowrail --verbose`` ($FLOWRAIL_VERBOSE=1):

- Ray Data logs "Starting execution", "Execution plan" and "execution finished" for every dataset, and each
  training worker builds one dataset per epoch; these INFO records are hidden from the console (Ray Data's own
  ``hide`` attribute) but still written to Ray Data's log file. Its warnings still show.
- Ray Train logs ``Reporting training result N: TrainingReport(...)`` on every rank at every report; hidden at
  INFO. Ray Train's own ``ray.train`` INFO logs go through its ``LoggingConfig`` (WARNING unless verbose).
- The driver draws one tqdm bar (step, loss, samples/s, data wait, ETA) from the reports the workers send to
  Ray Train: a callback on the Train controller (:func:`progress_callback`) passes rank 0's report to a queue that a
  driver thread reads.
- Jobs that are not a training run (``flowrail evaluate``): :func:`quiet_driver_logs` hides the driver's
  "Started a local Ray instance" and MLflow's store-setup INFO lines, and :class:`TaskProgress` draws one bar over
  work done in-process or in Ray tasks (they report through :func:`send_progress`).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

VERBOSE_ENV = "FLOWRAIL_VERBOSE"
_RAY_DATA_EXECUTOR_LOGGER = "ray.data._internal.execution.streaming_executor"
_REPORT_LINE = "Reporting training result"


def is_verbose(cfg: Any = None) -> bool:
    """``--verbose`` / $FLOWRAIL_VERBOSE, or ``log.verbose`` of a config that has a ``log`` section."""
    if os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"):
        return True
    log = getattr(cfg, "log", None)
    return bool(getattr(log, "verbose", False))


class _HideInfo(logging.Filter):
    """Marks INFO-and-below records ``hide`` (Ray Data's console handler drops them; its file handler keeps them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            record.hide = True
        return True


class _DropReportLines(logging.Filter):
    """Drops Ray Train's per-rank ``Reporting training result N: ...`` INFO lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.WARNING and str(record.msg).startswith(_REPORT_LINE))


class _HideProgressBarNotice(logging.Filter):
    """Hides Ray Data's "Progress bars disabled. To enable, set ..." (a warning about a setting, once per worker:
    training workers have no terminal to draw Ray Data's bars on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(("Progress bars disabled", "Progress bars for operators disabled")):
            record.hide = True
        return True


class _DropHttpRetries(logging.Filter):
    """Drops urllib3's "Retrying (Retry(total=N ...)) after connection broken ..." warnings: MLflow's retries during a
    tracking outage print one per attempt on every process that logs; flowrail prints one line once they are spent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Retrying (")


def _add_once(logger_name: str, filter_type: type[logging.Filter]) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, filter_type) for f in logger.filters):
        logger.addFilter(filter_type())


def quiet_ray_logs() -> None:
    """In this process (a training worker, an evaluation task, the driver): hide Ray Data's per-dataset execution
    INFO lines and Ray Train's per-report lines from the console. Idempotent; warnings are untouched."""
    _add_once(_RAY_DATA_EXECUTOR_LOGGER, _HideInfo)
    _add_once("ray.data._internal.progress", _HideProgressBarNotice)
    _add_once("urllib3.connectionpool", _DropHttpRetries)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "Started monitoring ..." per node
    try:  # Ray Train V2 names this logger after its file path, not "ray.train..."
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    _add_once(train_context.__file__, _DropReportLines)


# "Started a local Ray instance"; Tune's "Wrote the latest version of all result files"; MLflow's store set-up
_DRIVER_INFO_LOGGERS = ("ray._private.worker", "ray.tune", "mlflow")


def quiet_driver_logs() -> None:
    """On a job's driver: Ray's start-up and Tune's INFO lines and MLflow's INFO lines (database tables created/updated) off;
    their warnings still show. MLflow sets its logger's level when imported, so it is imported first."""
    import mlflow  # noqa: F401

    for name in _DRIVER_INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def restore_ray_logs() -> None:
    """Undo :func:`quiet_ray_logs` and :func:`quiet_driver_logs` in this process (tests; a verbose job in a
    long-lived process)."""
    for name in _DRIVER_INFO_LOGGERS[:-1]:
        logging.getLogger(name).setLevel(logging.NOTSET)
    if logging.getLogger("mlflow").level == logging.WARNING:
        logging.getLogger("mlflow").setLevel(logging.INFO)  # MLflow's own default
    names = [_RAY_DATA_EXECUTOR_LOGGER, "ray.data._internal.progress", "urllib3.connectionpool"]
    try:
        from ray.train.v2._internal.execution import context as train_context

        names.append(train_context.__file__)
    except ImportError:
        pass
    for name in names:
        logger = logging.getLogger(name)
        quiet = (_HideInfo, _HideProgressBarNotice, _DropReportLines, _DropHttpRetries)
        for f in [f for f in logger.filters if isinstance(f, quiet)]:
            logger.removeFilter(f)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.NOTSET)


def train_logging_config(verbose: bool) -> Any:
    """Ray Train's console level for its own ``ray.train`` logs: INFO when verbose, else WARNING."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING")


def on_driver() -> bool:
    """True in the process that called ``ray.init`` (not in a Tune trial or any other Ray worker)."""
    import ray

    try:
        return ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE
    except Exception:  # noqa: BLE001 - Ray not initialised: a plain process
        return True


def describe(report: dict[str, Any]) -> dict[str, str]:
    """The bar's postfix from one worker report: loss, samples/s and the fraction of time spent waiting for data."""
    shown = {}
    if "loss" in report:
        shown["loss"] = f"{report['loss']:.4f}"
    if "samples_per_s" in report:
        shown["samples/s"] = f"{report['samples_per_s']:.0f}"
    if "data_wait_fraction" in report:
        shown["data wait"] = f"{100 * report['data_wait_fraction']:.0f}%"
    return shown


class StepBar:
    """One tqdm bar over training steps; ``update`` takes a worker report (its ``step`` is absolute)."""

    def __init__(self, total: int, desc: str, file: Any = None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=file or sys.stderr,
                        mininterval=0.5, bar_format="{desc}: {percentage:3.0f}%|{bar:20}| step {n}/{total} "
                                                     "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        self._started = False

    def update(self, report: dict[str, Any]) -> None:
        step = int(report.get("step", self.bar.n))
        self.bar.set_postfix(describe(report), refresh=False)
        if not self._started:  # the first report (a resumed run's first is past its checkpoint): rate from here on
            self._started = True
            self.bar.initial = self.bar.n = self.bar.last_print_n = step
            self.bar.start_t = self.bar.last_print_t = self.bar._time()
            self.bar.refresh()
            return
        self.bar.update(max(0, step - self.bar.n))

    def close(self) -> None:
        self.bar.close()


def progress_callback(queue: Any) -> Any:
    """A Ray Train ``UserCallback`` (it runs on the Train controller) that puts rank 0's report of every
    ``ray.train.report`` on the driver's ``queue``; defined here so that Ray is imported only when needed."""
    from ray.train import UserCallback

    class _Forwarder(UserCallback):
        def __init__(self, q: Any) -> None:
            self.queue = q

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                try:
                    self.queue.put_nowait(dict(metrics[0]))
                except Exception:  # noqa: BLE001 - the console must never fail a run
                    pass

    return _Forwarder(queue)


class DriverProgress:
    """Context manager on the driver: a queue actor, the controller callback feeding it, a thread drawing the bar.

    ``callbacks`` is the Ray Train callback list to add to the run (empty when no bar is shown)."""

    def __init__(self, total_steps: int, desc: str, enabled: bool = True) -> None:
        self.total, self.desc, self.enabled = total_steps, desc, enabled
        self.callbacks: list[Any] = []
        self._queue: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reports = 0

    def __enter__(self) -> DriverProgress:
        if not self.enabled:
            return self
        from ray.util.queue import Queue

        self._queue = Queue(actor_options={"num_cpus": 0})
        self.callbacks = [progress_callback(self._queue)]
        self._thread = threading.Thread(target=self._draw, name="flowrail-progress", daemon=True)
        self._thread.start()
        return self

    def _draw(self) -> None:
        from ray.util.queue import Empty

        bar = StepBar(self.total, self.desc)
        try:
            while not self._stop.is_set() or not self._queue.empty():
                try:
                    report = self._queue.get(timeout=0.5)
                except Empty:
                    continue
                self.reports += 1
                bar.update(report)
        except Exception:  # noqa: BLE001 - the queue actor went away with Ray; the run's outcome is reported elsewhere
            pass
        finally:
            bar.close()

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        _stop_feed(self._stop, self._thread, self._queue)


def _stop_feed(stop: threading.Event, thread: threading.Thread | None, queue: Any) -> None:
    """Stop a bar's reader thread and shut its Ray queue down (a queue gone with Ray needs nothing)."""
    stop.set()
    if thread is not None:
        thread.join(timeout=10)
    if queue is not None:
        try:
            queue.shutdown()
        except Exception:  # noqa: BLE001
            pass


def send_progress(feed: Any, done: int, doing: str) -> None:
    """Tell the driver's :class:`TaskProgress` that ``done`` more units are finished and what is being done now.

    ``feed`` is its :attr:`TaskProgress.feed`: a callable in-process, a Ray queue in a Ray task, None when no bar."""
    if feed is None:
        return
    try:
        if callable(feed):
            feed(done, doing)
        else:
            feed.put_nowait((done, doing))
    except Exception:  # noqa: BLE001 - the console must never fail the work
        pass


class TaskProgress:
    """Context manager on the driver: one tqdm bar over ``total`` units (samples) with what is being done now.

    ``feed`` is what the work reports to with :func:`send_progress`: the bar's own update function when the work
    runs in this process (``remote=False``), a Ray queue actor (picklable, so Ray tasks can hold it) read by a driver
    thread when it runs in Ray tasks (after :meth:`start_remote`, once Ray is up). ``doing`` sets the postfix for driver-side phases. Disabled: ``feed`` is None."""

    def __init__(self, total: int, desc: str, unit: str, remote: bool, enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.remote, self.enabled = total, desc, unit, remote, enabled
        self.feed: Any = None
        self.bar: Any = None
        self._queue: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TaskProgress:
        if not self.enabled:
            return self
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.5, bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n}/{total} {unit} "
                                                     "[{elapsed}<{remaining}{postfix}]")
        if not self.remote:
            self.feed = self._advance
        return self

    def start_remote(self) -> None:
        """Make ``feed`` a Ray queue (Ray must be initialised) read by a driver thread; only when ``remote``."""
        if not (self.enabled and self.remote) or self._queue is not None:
            return
        from ray.util.queue import Queue

        self._queue = self.feed = Queue(actor_options={"num_cpus": 0})
        self._thread = threading.Thread(target=self._drain, name="flowrail-task-progress", daemon=True)
        self._thread.start()

    def _advance(self, done: int, doing: str) -> None:
        self.bar.set_postfix_str(doing, refresh=False)
        if done:
            self.bar.update(done)
        else:
            self.bar.refresh()

    def doing(self, what: str) -> None:
        """A driver-side phase (loading a classifier, reference statistics, computing metrics)."""
        if self.bar is not None:
            self._advance(0, what)

    def _drain(self) -> None:
        from ray.util.queue import Empty

        try:
            while not self._stop.is_set() or not self._queue.empty():
                try:
                    done, doing = self._queue.get(timeout=0.5)
                except Empty:
                    continue
                self._advance(done, doing)
        except Exception:  # noqa: BLE001 - the queue actor went away with Ray
            pass

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        _stop_feed(self._stop, self._thread, self._queue)
        self.bar.close()
