"""``flowrail run``: the embedded default end to end — digits shards (if missing) → train 2 workers × ZeRO-2 →
sample → MLflow; prints the run id and how to open the MLflow UI."""
from __future__ import annotations

from pathlib import Path

from jobs.train import parse


def main(argv: list[str]) -> int:
    from pipeline.data.shards import MANIFEST
    from pipeline.data.sources import write_digits
    from pipeline.tracking import mlflow_ui_hint
    from pipeline.train.trainer import fit

    cfg = parse(argv, default_config="run")
    shards = Path(cfg.data.shards)
    if not (shards / MANIFEST).is_file():
        root = shards.parent
        print(f"[flowrail] writing digits shards to {root}", flush=True)
        write_digits(root)
    result = fit(cfg)
    print()
    print(f"MLflow run id: {result.run_id}")
    print(f"sample grid:   {result.grid}")
    print(f"checkpoint:    {result.checkpoint}")
    print(f"open the MLflow UI: {mlflow_ui_hint(result.tracking_uri)}")
    return 0
