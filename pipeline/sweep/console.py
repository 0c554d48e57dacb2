"""The sweep's console: one trial table (trial, config, state, iteration, step, metric, best so far) redrawn in place,
instead of Tune's pages of per-trial output.

Tune runs its trial loop in the driver process and calls a ``ray.tune.Callback`` there on every trial event; the
table is drawn from those calls, with Tune's own reporter silenced (``RunConfig(verbose=0)``). ``flowrail --verbose``
keeps Tune's reporter (``verbose=1``) and draws no table.

On a terminal the table is redrawn in place (cursor up, clear to end, reprint; at most every 0.5 s and on every state
change); when stderr is not a terminal (a CI log, a file) it is printed again only when a trial's state changes,
so a log holds a handful of tables rather than one per result.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from ray.tune import Callback


@dataclass
class TrialRow:
    """What the table shows of one trial; ``best`` is the best value of the metric the trial has reported."""

    trial_id: str
    config: str
    state: str = "PENDING"
    iteration: int = 0
    step: int | None = None
    metric: float | None = None
    best: float | None = None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe_config(config: dict[str, Any]) -> str:
    """``transport.path=gvp, train.lr=0.003``: the trial's sampled keys (Tune's config is the dotted space)."""
    return ", ".join(f"{k}={_short(v)}" for k, v in config.items())


def render(rows: list[TrialRow], metric: str, mode: str) -> list[str]:
    """The table's lines: a header and one row per trial; the trial holding the best value so far is starred."""
    sign = 1 if mode == "min" else -1
    scored = [r for r in rows if r.best is not None]
    leader = min(scored, key=lambda r: sign * r.best).trial_id if scored else None
    header = ["trial", "config", "state", "iter", "step", metric, f"best {metric}"]
    body = [[("*" if r.trial_id == leader else " ") + r.trial_id, r.config, r.state, str(r.iteration),
             "" if r.step is None else str(r.step), "" if r.metric is None else f"{r.metric:.5g}",
             "" if r.best is None else f"{r.best:.5g}"] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body]]


class LiveBlock:
    """A block of lines on ``file`` that is redrawn in place (``in_place``: a terminal) or reprinted when it changes."""

    def __init__(self, file: TextIO, in_place: bool) -> None:
        self.file, self.in_place = file, in_place
        self._height = 0
        self._last: list[str] = []

    def show(self, lines: list[str]) -> None:
        if lines == self._last:
            return
        if self.in_place and self._height:
            self.file.write(f"\x1b[{self._height}F\x1b[J")  # to the block's first line, clear to the end
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()
        self._height, self._last = len(lines), list(lines)


class TrialTable(Callback):
    """A Tune callback (it runs in the driver's trial loop) drawing the trial table on stderr.

    Tune pickles its run config (with this callback) into the experiment for ``--resume``: the stream is not kept in
    the state, and a resumed sweep draws its table again."""

    def __init__(self, metric: str, mode: str) -> None:
        self.metric, self.mode = metric, mode
        self.rows: dict[str, TrialRow] = {}
        self._block: LiveBlock | None = None
        self._drawn_at = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "rows": {}, "_block": None, "_drawn_at": 0.0}

    def _row(self, trial: Any) -> TrialRow:
        row = self.rows.get(trial.trial_id)
        if row is None:
            row = self.rows[trial.trial_id] = TrialRow(trial.trial_id, describe_config(dict(trial.config)))
            self._restore(row, trial)
        return row

    def _restore(self, row: TrialRow, trial: Any) -> None:
        """A trial a resumed sweep restored (finished or paused before the kill) shows what it had reported: its
        last result, and its best value from Tune's per-trial metric summary (``{metric: {"min", "max", ...}}``)."""
        metadata = getattr(trial, "run_metadata", None)
        last = dict(getattr(metadata, "last_result", None) or {})
        if "training_iteration" not in last:
            return
        self._record(row, last)
        best = (getattr(metadata, "metric_analysis", None) or {}).get(self.metric, {}).get(self.mode)
        if isinstance(best, (int, float)) and best == best:
            row.best = float(best)

    def _record(self, row: TrialRow, result: dict) -> None:
        row.iteration = int(result.get("training_iteration", row.iteration + 1))
        row.step = int(result["step"]) if "step" in result else row.step
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and value == value:  # not NaN
            row.metric = float(value)
            better = row.best is None or (value < row.best if self.mode == "min" else value > row.best)
            row.best = float(value) if better else row.best

    def _draw(self, trials: list[Any], state_changed: bool) -> None:
        for trial in trials:
            row = self._row(trial)
            state_changed |= row.state != trial.status
            row.state = trial.status
        if self._block is None:
            self._block = LiveBlock(sys.stderr, in_place=sys.stderr.isatty())
        now = time.monotonic()
        if state_changed or (self._block.in_place and now - self._drawn_at >= 0.5):
            ordered = sorted(self.rows.values(), key=lambda r: r.trial_id)  # Tune numbers its trials _00000, _00001
            self._block.show(render(ordered, self.metric, self.mode))
            self._drawn_at = now

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        self._record(self._row(trial), result)
        self._draw(trials, state_changed=False)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._draw(trials, state_changed=False)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self._draw(trials, state_changed=True)
