"""Flow-map benchmark on digits: the teacher at 1/2/4/8/32 Euler steps vs its flow map at 1/2/4 steps.

    python -m benchmarks.flow_maps.run --teacher RUN_OR_CKPT --student RUN_OR_CKPT [RUN_OR_CKPT ...] [--seeds 0 1 2]

Each row is evaluated with flowrail's own evaluation (``evals.evaluate.run_evaluation``: fd_digits and
classifier_accuracy on ``--num-samples`` class-balanced samples) once per evaluation seed; the table gives the
mean and the spread (min-max) over seeds. Training cost (steps, wall time) is read from each checkpoint's MLflow
run (start to end of ``flowrail run`` / ``flowrail train``, Ray start-up included). Writes ``results.csv`` and
``table.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Any

TEACHER_STEPS = (1, 2, 4, 8, 32)
FLOW_MAP_STEPS = (1, 2, 4)
METRICS = ("fd_digits", "classifier_accuracy")


def evaluate(trained: Any, method: str, steps: int, seed: int, num_samples: int, cache_dir: str | None) -> dict:
    from evals.evaluate import run_evaluation

    cfg = trained.config.model_copy(deep=True)
    cfg.sampler = cfg.sampler.model_copy(update={"method": method, "solver": "euler", "steps": steps,
                                                 "time_shift": 1.0})
    cfg.eval = cfg.eval.model_copy(update={"metrics": list(METRICS), "num_samples": num_samples, "seed": seed,
                                           "num_workers": 1, "cache_dir": cache_dir or cfg.eval.cache_dir})
    return run_evaluation(trained, cfg).metrics


def training_cost(trained: Any) -> tuple[int, float | None]:
    """(optimizer steps, wall seconds of the training run from its MLflow run), wall None if not readable."""
    from pipeline.config import tracking_uri
    from pipeline.tracking import client

    try:
        info = client(tracking_uri(trained.config)).get_run(trained.run_id).info
        return trained.step, (info.end_time - info.start_time) / 1000 if info.end_time else None
    except Exception:  # noqa: BLE001 - a moved run directory: report the steps only
        return trained.step, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help="the flow model (a checkpoint or run directory)")
    parser.add_argument("--student", nargs="*", default=[], help="flow-map checkpoints or run dirs (none: teacher only)")
    parser.add_argument("--no-teacher", action="store_true", help="evaluate the students only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="benchmarks/flow_maps")
    args = parser.parse_args(argv)
    if args.teacher is None and not args.no_teacher:
        parser.error("--teacher is required unless --no-teacher")

    import torch

    from pipeline.train.checkpoint import load_trained

    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    models = [] if args.no_teacher else [("teacher", args.teacher, "ode", TEACHER_STEPS)]
    models += [(None, student, "flow_map", FLOW_MAP_STEPS) for student in args.student]
    for label, source, method, step_list in models:
        trained = load_trained(source)
        label = label or f"flow map ({trained.config.run_name})"
        steps_trained, wall = training_cost(trained)
        for steps in step_list:
            per_seed = [evaluate(trained, method, steps, seed, args.num_samples, args.cache_dir) for seed in args.seeds]
            row: dict[str, Any] = {"model": label, "sampler": f"{method}{'/euler' if method == 'ode' else ''}",
                                   "steps": steps, "nfe": int(per_seed[0]["nfe"]), "train_steps": steps_trained,
                                   "train_wall_s": round(wall, 1) if wall is not None else "",
                                   "checkpoint": str(trained.path)}
            for m in METRICS:
                vals = [r[m] for r in per_seed]
                row[m] = statistics.fmean(vals)
                row[f"{m}_min"], row[f"{m}_max"] = min(vals), max(vals)
            rows.append(row)
            print(f"{label} {method:8s} steps={steps:2d}  fd_digits={row['fd_digits']:.3f} "
                  f"[{row['fd_digits_min']:.3f}, {row['fd_digits_max']:.3f}]  acc={row['classifier_accuracy']:.3f}",
                  flush=True)
    if not rows:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| model | sampler | steps (NFE) | fd_digits mean [min, max] | classifier acc mean [min, max] | "
             "training steps | training wall s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} ({r['nfe']}) | {r['fd_digits']:.3f} "
                     f"[{r['fd_digits_min']:.3f}, {r['fd_digits_max']:.3f}] | {r['classifier_accuracy']:.3f} "
                     f"[{r['classifier_accuracy_min']:.3f}, {r['classifier_accuracy_max']:.3f}] | "
                     f"{r['train_steps']} | {r['train_wall_s']} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
