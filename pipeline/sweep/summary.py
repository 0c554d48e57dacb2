"""The sweep's summary table: one row per trial and per (trial, sampler configuration), ranked on the metric."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    kind: str  # "trial" (its training-time sampler) or "sampling" (a sampler configuration on its checkpoint)
    trial_id: str
    run_id: str
    params: dict[str, Any]
    sampler: str
    metric: float
    status: str
    step: int
    checkpoint: Path | None = None
    nfe: float | None = None
    sampler_settings: dict[str, Any] | None = None
    guidance_settings: dict[str, Any] | None = None
    trial_run_id: str | None = None
    rank: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_trial(cls, trial: Any, metric: str) -> "Row":
        return cls(kind="trial", trial_id=trial.trial_id, run_id=trial.run_id, params=trial.params,
                   sampler="trained", metric=trial.metrics.get(metric, math.nan), status=trial.status,
                   step=trial.step, checkpoint=trial.checkpoint, nfe=trial.metrics.get("nfe"),
                   trial_run_id=trial.run_id)


def rank_rows(rows: list[Row], metric: str, mode: str) -> list[Row]:
    """Completed rows with a finite metric are ranked 1.. (best first); stopped/failed rows follow unranked."""
    sign = 1.0 if mode == "min" else -1.0
    ok = sorted((r for r in rows if r.status == "completed" and math.isfinite(r.metric)),
                key=lambda r: sign * r.metric)
    for i, r in enumerate(ok, 1):
        r.rank = i
    rest = [r for r in rows if r.rank is None]
    rest.sort(key=lambda r: (r.status, r.trial_id))
    return ok + rest


def write_summary(rows: list[Row], path: Path, metric: str) -> Path:
    """Write the ranked table as CSV and print it."""
    keys = sorted({k for r in rows for k in r.params})
    header = ["rank", "kind", "trial", "sampler", metric, "nfe", "step", "status", *keys, "run_id"]
    table = []
    for r in rows:
        table.append(["" if r.rank is None else r.rank, r.kind, r.trial_id, r.sampler,
                      "" if not math.isfinite(r.metric) else f"{r.metric:.5g}",
                      "" if r.nfe is None else int(r.nfe), r.step, r.status,
                      *[r.params.get(k, "") for k in keys], r.run_id])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(table)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    print("\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *table]),
          flush=True)
    return path
