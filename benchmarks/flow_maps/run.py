"""Flow-map benchmark on digits: the teacher at 1/2/4/8/32 Euler steps vs its flow maps at 1/2/4 steps.

Protocol (what makes a number here a test number):
- reference images: the digits **val** split (never trained on), its classifier features cut into two disjoint halves:
  ``validation`` (even indices) chooses every setting (recipe options, training length, checkpoints), ``test`` (odd
  indices) reports; the two halves also use disjoint evaluation seeds (validation 100, 101, 102; test 0, 1, 2).
- every arm is trained with 3 training seeds (``seed=0,1,2``); each checkpoint is sampled once per evaluation seed
  (``--per-class`` class-balanced samples); a cell is the mean over training seeds of the per-seed mean over
  evaluation seeds, ± the sd over training seeds (the spread a rerun of training would show).
- ``fd_digits`` = Fréchet distance in the digits classifier's 64-d feature space (evals.digits_metrics), lower is
  better; ``classifier_accuracy`` = fraction of samples classified as their requested label.

    python -m benchmarks.flow_maps.run --half validation --label teacher --teacher RUN_OR_CKPT --out DIR
    python -m benchmarks.flow_maps.run --half validation --label dmf --student CKPT_SEED0 CKPT_SEED1 CKPT_SEED2
    python -m benchmarks.flow_maps.run --merge DIR/results/*-test-*.json --out DIR

An evaluation writes one file ``DIR/results/<label>-<half>-<UTC time>.json`` per invocation (never overwrites);
``--merge`` refuses files whose settings differ (half, per-class count, evaluation seeds, teacher, and for flow maps
the training steps and training seeds) and writes ``DIR/table-<half>.md`` and ``DIR/results-<half>.csv``.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

TEACHER_STEPS = (1, 2, 4, 8, 32)
FLOW_MAP_STEPS = (1, 2, 4)
EVAL_SEEDS = {"validation": (100, 101, 102), "test": (0, 1, 2)}
MATCHED = ("half", "per_class", "eval_seeds", "teacher")  # settings every merged file must share


class BenchmarkError(Exception):
    """A benchmark input that cannot be used (one line, exit 2)."""


class DigitsHalves:
    """Classifier features of the digits val split, cut into the ``validation`` and ``test`` halves."""

    def __init__(self, image_size: int) -> None:
        from evals.digits_classifier import digits_images, load_digits_classifier

        self.clf = load_digits_classifier()
        images, _ = digits_images("val", image_size)
        feats = self.clf.features(images).numpy()
        self.halves = {"validation": feats[0::2], "test": feats[1::2]}

    def score(self, trained: Any, method: str, steps: int, seed: int, per_class: int, half: str) -> tuple[float, float]:
        """(fd_digits against ``half``, classifier accuracy) of ``10 * per_class`` samples with ``method``/``steps``."""
        import numpy as np
        import torch

        from evals.frechet import frechet_distance
        from pipeline.sampling import sample_classes
        from pipeline.sweep.metric import with_sampler

        sampler = trained.config.sampler.model_copy(update={"method": method, "solver": "euler", "steps": steps,
                                                            "time_shift": 1.0})
        view = with_sampler(trained, sampler, trained.config.guidance)
        labels = torch.arange(10).repeat_interleave(per_class)
        with torch.no_grad():
            out = sample_classes(view, labels, seed)
        x = out.x.float().clamp(-1, 1)
        gen = self.clf.features(x).numpy()
        ref = self.halves[half]
        fd = frechet_distance(gen.mean(0), np.cov(gen, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))
        return float(fd), float((self.clf.predict(x) == labels).double().mean())


def _run_dir(path: str | Path | None) -> str | None:
    """A checkpoint's run directory (a run directory stays itself): how a teacher is named in the settings."""
    if path is None:
        return None
    p = Path(path).resolve()
    return str(p.parent if (p / "flowrail.json").exists() else p)


def _summary(trained: Any) -> dict[str, Any]:
    cfg = trained.config
    return {"checkpoint": str(trained.path), "train_seed": cfg.seed, "train_steps": trained.step,
            "objective": cfg.objective.name, "flow_map": cfg.flow_map.model_dump(mode="json")
            if cfg.objective.name == "flow_map" else None}


def evaluate_group(args: argparse.Namespace) -> dict[str, Any]:
    """One results record: the teacher or one arm (one checkpoint per training seed) on one half."""
    import torch

    from pipeline.train.checkpoint import load_trained

    torch.set_num_threads(args.threads)
    sources = [args.teacher] if args.student is None else args.student
    if not sources or any(s is None for s in sources):
        raise BenchmarkError("eval needs --teacher (the flow model) or --student CKPT [CKPT ...] (one per training seed)")
    models = [load_trained(s) for s in sources]
    flow_map = args.student is not None
    if flow_map and any(m.config.objective.name != "flow_map" for m in models):
        raise BenchmarkError("--student: every checkpoint must be a flow map (objective.name=flow_map)")
    summaries = [_summary(m) for m in models]
    if flow_map:
        settings = {json.dumps({k: v for k, v in s["flow_map"].items() if k != "teacher"}, sort_keys=True)
                    for s in summaries}
        if len(settings) > 1 or len({s["train_steps"] for s in summaries}) > 1:
            raise BenchmarkError(f"--student {args.label}: the checkpoints differ in flow_map settings or training "
                                 "steps (one arm = one setting, several training seeds)")
        if len({s["train_seed"] for s in summaries}) < len(summaries):
            raise BenchmarkError(f"--student {args.label}: two checkpoints have the same training seed")
    halves = DigitsHalves(models[0].config.data.image_size)
    seeds = EVAL_SEEDS[args.half] if args.eval_seeds is None else tuple(args.eval_seeds)
    method, step_list = ("flow_map", FLOW_MAP_STEPS) if flow_map else ("ode", TEACHER_STEPS)
    rows = []
    for steps in args.steps or step_list:
        per_model = []
        for trained, summary in zip(models, summaries):
            scores = [halves.score(trained, method, steps, seed, args.per_class, args.half) for seed in seeds]
            per_model.append({**{k: summary[k] for k in ("checkpoint", "train_seed", "train_steps")},
                              "fd_digits": [s[0] for s in scores], "classifier_accuracy": [s[1] for s in scores]})
            print(f"[{args.label} {args.half}] seed {summary['train_seed']} {method} steps={steps}: fd_digits "
                  f"{statistics.fmean(per_model[-1]['fd_digits']):.3f}", flush=True)
        rows.append({"steps": steps, "sampler": method, "models": per_model})
    return {"label": args.label, "kind": "flow_map" if flow_map else "teacher",
            "settings": {"half": args.half, "per_class": args.per_class, "eval_seeds": list(seeds),
                         "teacher": _run_dir(models[0].config.init_from) if flow_map
                         else _run_dir(models[0].path),
                         "train_steps": summaries[0]["train_steps"],
                         "train_seeds": sorted(s["train_seed"] for s in summaries),
                         "flow_map": summaries[0]["flow_map"]},
            "rows": rows, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_record(record: dict[str, Any], out: Path) -> Path:
    folder = out / "results"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = folder / f"{record['label']}-{record['settings']['half']}-{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{record['label']}-{record['settings']['half']}-{stamp}-{n}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def check_settings(records: list[dict[str, Any]]) -> None:
    """Every file must share the evaluation settings; flow-map arms the training steps and seeds (an equal budget)."""
    if not records:
        raise BenchmarkError("merge needs at least one results file")
    first = records[0]
    for rec in records[1:]:
        for key in MATCHED:
            if rec["settings"][key] != first["settings"][key]:
                raise BenchmarkError(f"merge: {rec['label']} has {key}={rec['settings'][key]} but {first['label']} "
                                     f"has {first['settings'][key]}")
    arms = [r for r in records if r["kind"] == "flow_map"]
    for rec in arms[1:]:
        for key in ("train_steps", "train_seeds"):
            if rec["settings"][key] != arms[0]["settings"][key]:
                raise BenchmarkError(f"merge: flow map {rec['label']} has {key}={rec['settings'][key]} but "
                                     f"{arms[0]['label']} has {arms[0]['settings'][key]} (arms are compared at "
                                     "equal training)")
    labels = [r["label"] for r in records]
    if len(set(labels)) < len(labels):
        raise BenchmarkError(f"merge: a label appears twice ({', '.join(labels)})")


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (label, steps): mean ± sd over training seeds of the per-seed mean over evaluation seeds."""
    out = []
    for rec in records:
        for row in rec["rows"]:
            cell: dict[str, Any] = {"model": rec["label"], "sampler": row["sampler"], "steps": row["steps"],
                                    "train_steps": rec["settings"]["train_steps"],
                                    "train_seeds": len(row["models"])}
            for metric in ("fd_digits", "classifier_accuracy"):
                per_seed = [statistics.fmean(m[metric]) for m in row["models"]]
                cell[metric] = statistics.fmean(per_seed)
                cell[f"{metric}_sd"] = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
            out.append(cell)
    return out


def merge(files: list[Path], out: Path) -> Path:
    records = [json.loads(Path(f).read_text()) for f in files]
    check_settings(records)
    cells = aggregate(records)
    half = records[0]["settings"]["half"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"results-{half}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(cells[0]))
        writer.writeheader()
        writer.writerows(cells)
    s = records[0]["settings"]
    lines = [f"{half} half; {10 * s['per_class']} samples per evaluation, evaluation seeds {s['eval_seeds']}; "
             "mean ± sd over training seeds", "",
             "| model | sampler | steps (NFE) | fd_digits | classifier acc. | training steps | training seeds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for c in cells:
        lines.append(f"| {c['model']} | {c['sampler']} | {c['steps']} | {c['fd_digits']:.2f} ± "
                     f"{c['fd_digits_sd']:.2f} | {c['classifier_accuracy']:.3f} ± {c['classifier_accuracy_sd']:.3f} | "
                     f"{c['train_steps']} | {c['train_seeds']} |")
    table = out / f"table-{half}.md"
    table.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="results files to check (same settings) and merge into the table; no evaluation")
    parser.add_argument("--half", choices=sorted(EVAL_SEEDS), default=None)
    parser.add_argument("--label", default=None, help="the row name (teacher, dmf, split, ...)")
    parser.add_argument("--teacher", default=None, help="the flow model (a checkpoint or run directory)")
    parser.add_argument("--student", nargs="+", default=None, help="one flow-map checkpoint per training seed")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=None, help="default: the half's own seeds")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="default: 1 2 4 8 32 (teacher), 1 2 4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/flow_maps"))
    args = parser.parse_args(argv)
    try:
        if args.merge is not None:
            merge(args.merge, args.out)
            return 0
        if args.half is None or args.label is None:
            raise BenchmarkError("an evaluation needs --half and --label (or give --merge FILES)")
        print(f"wrote {write_record(evaluate_group(args), args.out)}")
    except (BenchmarkError, FileNotFoundError) as exc:
        print(f"benchmarks.flow_maps.run: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
