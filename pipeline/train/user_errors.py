"""A user error (bad data, NaN losses beyond ``train.max_bad_steps``...) is not retried by ``train.max_failures``.

Ray Train restarts the worker group on any worker error; a :class:`FlowrailError` would fail again the same way. The
worker that raises it records it in the run's storage; every restarted worker re-raises it before building anything,
so the run ends with the same one-line error after cheap restarts instead of repeating the work. The driver clears
the record before each ``fit`` (a re-run after the input was fixed trains normally).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import FlowrailError


def marker_path(cfg: Any) -> str:
    """Where a run records its user error: beside its run record and metric spool, in the run's storage."""
    from pipeline.tracking import metric_spool

    return str(metric_spool(cfg).parent / "user_error.json")


def record(marker: str | Path | None, exc: FlowrailError) -> None:
    if not marker:
        return
    path = Path(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"module": type(exc).__module__, "name": type(exc).__qualname__,
                                "message": str(exc)}))


def replay(marker: str | Path | None) -> None:
    """Raise the user error an earlier attempt of this fit recorded, if any."""
    if not marker or not Path(marker).is_file():
        return
    saved = json.loads(Path(marker).read_text())
    try:
        cls = getattr(importlib.import_module(saved["module"]), saved["name"])
    except (ImportError, AttributeError):
        cls = FlowrailError
    if not (isinstance(cls, type) and issubclass(cls, FlowrailError)):
        cls = FlowrailError
    raise cls(saved["message"])


def clear(marker: str | Path) -> None:
    Path(marker).unlink(missing_ok=True)


def run_recorded(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any]) -> None:
    """Run a worker loop under the record: replay an earlier attempt's user error, record a new one."""
    marker = loop_config.get("user_error_marker")
    replay(marker)  # a restarted group: fail as the first attempt did, before building anything
    try:
        loop(loop_config)
    except FlowrailError as exc:
        record(marker, exc)
        raise
