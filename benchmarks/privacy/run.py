"""Privacy benchmark on digits: SFBD flow vs clean-only vs noisy-only (and optionally SFBD / the clean reference),
3 training seeds with fresh releases, compute-matched baselines, memorization audits. One command, from scratch:

    nice -n 10 python benchmarks/privacy/run.py --out runs/bench_privacy --overwrite

Per seed k (REFERENCE.md 7): the digits train split (1438 images, 8x8) is copied to ``seed<k>/sensitive`` and marked
sensitive; a consent list naming a random 4% of its keys (seed k) is written inside its fence; it is released once
with s = 0.59 (a fresh 256-bit secret generated inside the fence, a fresh release id, labels declared non-sensitive).

- ``sfbd_flow`` trains ``--steps`` steps (seed k). Its measured sample-gradient count G (samples that went through a
  backward pass, all workers) sets the budget of every other method: ``G / (batch x workers)`` steps of one batch.
  Denoising forward passes (samples x NFE) are reported per row beside it.
- ``clean_only`` is early-stopped on a validation Fréchet distance: checkpoints every ``--select-every`` steps, the
  one with the lowest fd against the even-indexed half of the digits val split is kept.
- Every row reports fd_digits against the *odd-indexed* val half (disjoint from the selection half), the digits
  classifier's accuracy on the samples, and ``privacy.audit_run.audit_checkpoint`` with the release.

Writes ``results.json`` (settings, code version and compute of every row; mean and sd per method; the claim check)
under --out and to --results, and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

METHODS = ["sfbd_flow", "clean_only", "noisy_only"]
OPTIONAL = ["sfbd", "clean_sensitive"]
SUMMARY = ["fd_test", "classifier_accuracy", "audit_gen_released_extracted_frac", "audit_gen_released_extracted_upper95",
           "audit_gen_consented_extracted_frac", "audit_gen_carlini_ratio_median", "audit_gen_carlini_ratio_p05",
           "audit_gen_released_nn_l2_p05", "audit_gen_released_nn_l2_median", "audit_floor_nn_l2_p05",
           "audit_floor_nn_l2_median", "audit_pool_recon_reid_frac", "audit_noisy_recon_reid_frac",
           "audit_pool_recon_extracted_frac", "audit_noisy_recon_extracted_frac", "audit_passed", "steps",
           "sample_gradients", "denoise_sample_nfe", "train_seconds"]


def code_version() -> str:
    """The git commit of the code that ran (``+dirty`` when tracked files differ), or the snapshot's CODE_VERSION."""
    stamp = ROOT / "CODE_VERSION"
    if stamp.is_file():
        return stamp.read_text().strip()
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def overrides(args: argparse.Namespace, seed_dir: Path, method: str, seed: int, steps: int,
              checkpoint_every: int) -> list[str]:
    o = {
        "run_name": f"bench-{method}", "run_dir": str(seed_dir / "runs"), "privacy.release": str(seed_dir / "release"),
        "privacy.method": "clean_only" if method == "clean_sensitive" else method,
        "data.batch_size": args.batch, "model.hidden_size": 64, "model.depth": 3, "model.num_heads": 4,
        "model.patch_size": 2, "train.num_workers": args.workers, "train.zero_stage": 2, "train.steps": steps,
        "train.lr": 2e-3, "train.ema_decay": 0.99, "train.log_every": 50, "train.checkpoint_every": checkpoint_every,
        "train.keep_checkpoints": 1000, "sampler.solver": "heun", "sampler.steps": args.sampler_steps, "seed": seed,
        "privacy.warmup_steps": args.steps // 4, "privacy.rounds": 2, "privacy.refresh_every": 20,
        "privacy.refresh_size": 128, "privacy.ramp_end": args.steps // 2, "privacy.denoise_steps": args.denoise_steps,
        "tracking.experiment": "privacy-benchmark",
    }
    if method == "clean_sensitive":
        o["privacy.clean_shards"] = str(args.out / "data" / "train")  # the public, unmarked copy of the same images
    return [f"{k}={v}" for k, v in o.items()]


class FrechetDigits:
    """fd_digits of a checkpoint's samples (``per_class`` per class) against one half of the digits val split."""

    def __init__(self, per_class: int) -> None:
        from evals.digits_classifier import digits_images, load_digits_classifier

        self.clf = load_digits_classifier()
        self.per_class = per_class
        xv, _ = digits_images("val")
        feats = self.clf.features(xv).numpy()
        self.halves = {"select": feats[0::2], "test": feats[1::2]}

    def __call__(self, checkpoint: Path, seed: int, half: str) -> tuple[float, float]:
        from evals.frechet import frechet_distance
        from pipeline.sampling import sample_classes
        from pipeline.train.checkpoint import load_trained

        trained = load_trained(checkpoint)
        labels = torch.arange(10).repeat_interleave(self.per_class)
        with torch.no_grad():
            x = sample_classes(trained, labels, seed).x.float().clamp(-1, 1)
        f_gen = self.clf.features(x).numpy()
        ref = self.halves[half]
        fd = frechet_distance(f_gen.mean(0), np.cov(f_gen, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))
        return float(fd), float((self.clf.predict(x) == labels).double().mean())


def all_checkpoints(run_root: Path) -> list[Path]:
    from pipeline.train.checkpoint import META, is_complete

    found = [m.parent for m in run_root.rglob(META) if is_complete(m.parent)]
    return sorted(found, key=lambda p: json.loads((p / META).read_text())["step"])


def prepare_seed(args: argparse.Namespace, seed: int) -> tuple[Path, Path, dict[str, Any]]:
    """A fresh sensitive copy, its consent list (inside the fence) and its release."""
    from privacy.boundary import mark_sensitive
    from privacy.release import release
    from pipeline.data.shards import iter_samples

    seed_dir = args.out / f"seed{seed}"
    sensitive = seed_dir / "sensitive"
    shutil.copytree(args.out / "data" / "train", sensitive)
    mark_sensitive(sensitive)
    keys = [k for k, _ in iter_samples(sensitive)]
    rng = np.random.default_rng(1000 + seed)
    chosen = sorted(keys[i] for i in rng.permutation(len(keys))[:int(round(args.clean_fraction * len(keys)))])
    consent = sensitive / "consent.txt"
    consent.write_text("\n".join(chosen) + "\n")
    rel = release(sensitive, seed_dir / "release", args.noise_std, consent_list=consent, release_labels=True,
                  samples_per_shard=256)
    return seed_dir, sensitive, rel.manifest


def train(args: argparse.Namespace, seed_dir: Path, method: str, seed: int, steps: int,
          checkpoint_every: int, attempts: int = 3) -> tuple[Any, float, int]:
    """One training run from scratch; a run that fails (e.g. a worker killed by the host's memory monitor on a
    shared machine) is restarted from scratch under a new run name, so the compute counts stay exact."""
    from pipeline.config import load_config
    from privacy.config import PrivacyTrainConfig
    from privacy.train import fit_privacy

    for attempt in range(1, attempts + 1):
        t0 = time.time()
        o = overrides(args, seed_dir, method, seed, steps, checkpoint_every)
        if attempt > 1:
            o.append(f"run_name=bench-{method}-attempt{attempt}")
        cfg = load_config(PrivacyTrainConfig, None, o)
        try:
            return fit_privacy(cfg, make_grid=False), time.time() - t0, attempt
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; the row records the attempts
            print(f"[bench] seed {seed} {method}: attempt {attempt} failed: {str(exc).strip()[:300]}", flush=True)
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def run_seed(args: argparse.Namespace, seed: int, fd: FrechetDigits, version: str) -> list[dict[str, Any]]:
    from privacy.audit_run import audit_checkpoint

    seed_dir, sensitive, rel = prepare_seed(args, seed)
    print(f"[bench] seed {seed}: release {rel['counts']}", flush=True)
    rows = []
    budget_steps = None
    for method in args.methods:
        if method in ("sfbd_flow", "sfbd"):  # two batches per step after the warm-up: compute reported per row
            steps = args.steps
        else:  # one batch per step: as many steps as give SFBD flow's sample-gradient count
            assert budget_steps is not None, "sfbd_flow runs first: it sets the compute budget"
            steps = budget_steps
        select = method == "clean_only"
        every = max(1, steps // args.select_points) if select else steps
        res, seconds, attempts = train(args, seed_dir, method, seed, steps, every)
        m = res.metrics
        if method == "sfbd_flow":
            budget_steps = int(round(m["sample_gradients"] / (args.batch * args.workers)))
        row: dict[str, Any] = {"method": method, "seed": seed, "code_version": version, "steps": steps,
                               "sample_gradients": float(m["sample_gradients"]),
                               "denoise_sample_nfe": float(m["denoise_sample_nfe"]), "train_seconds": seconds,
                               "mlflow_run_id": res.run_id, "attempts": attempts}
        checkpoint = res.checkpoint
        if select:
            curve = []
            for ck in all_checkpoints(Path(res.checkpoint).parent):
                f_sel, _ = fd(ck, seed=1, half="select")
                curve.append((json.loads((ck / "flowrail.json").read_text())["step"], f_sel, ck))
            best = min(curve, key=lambda c: c[1])
            checkpoint = best[2]
            row.update({"selected_step": best[0], "fd_select": best[1],
                        "fd_select_curve": [[s, f] for s, f, _ in curve]})
        row["fd_test"], row["classifier_accuracy"] = fd(checkpoint, seed=1, half="test")
        audit = audit_checkpoint(checkpoint, sensitive, release=seed_dir / "release", num_samples=args.audit_samples,
                                 seed=2, denoise_steps=args.audit_denoise_steps)
        row.update({f"audit_{k}": v for k, v in audit.items() if k not in ("mlflow_run_id",)})
        rows.append(row)
        print(f"[bench] seed {seed} {method}: steps {steps}  fd_test {row['fd_test']:.2f}  "
              f"released-extracted {audit['gen_released_extracted_frac']:.3f}  audit "
              f"{'pass' if audit['passed'] else 'fail'}  ({seconds:.0f}s)", flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """mean and sample sd (ddof 1) of every SUMMARY figure per method: {method: {figure: [mean, sd, n]}}."""
    out: dict[str, dict[str, list[float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out[method] = {}
        for k in SUMMARY:
            v = np.array([float(r[k]) for r in mine if isinstance(r.get(k), (int, float))], dtype=np.float64)
            if len(v):
                out[method][k] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)]
    return out


def claim(summary: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """"SFBD flow beats clean-only and noisy-only" on fd_test: holds when its mean + sd is below each baseline's
    mean - sd."""
    flow = summary.get("sfbd_flow", {}).get("fd_test")
    verdict = {}
    for base in ("clean_only", "noisy_only"):
        other = summary.get(base, {}).get("fd_test")
        if flow is None or other is None or flow[2] < 2 or other[2] < 2:
            verdict[base] = "not measured (fewer than 2 seeds)"
        else:
            verdict[base] = "holds" if flow[0] + flow[1] < other[0] - other[1] else "does not hold"
    return verdict


def table(summary: dict[str, dict[str, list[float]]]) -> str:
    cols = [("fd_test", "fd_digits (test half) ↓", "{:.2f}"), ("classifier_accuracy", "class acc", "{:.3f}"),
            ("audit_gen_released_extracted_frac", "extracted: released", "{:.3f}"),
            ("audit_gen_consented_extracted_frac", "extracted: consented", "{:.3f}"),
            ("audit_gen_carlini_ratio_median", "Carlini ratio median", "{:.2f}"),
            ("audit_gen_released_nn_l2_p05", "NN l2 p05 to released", "{:.3f}"),
            ("audit_floor_nn_l2_p05", "floor: real-vs-real NN l2 p05", "{:.3f}"),
            ("audit_pool_recon_reid_frac", "model's recon re-id", "{:.3f}"),
            ("audit_noisy_recon_reid_frac", "floor: noisy release re-id", "{:.3f}"),
            ("audit_passed", "audit passed", "{:.2f}"), ("steps", "steps", "{:.0f}"),
            ("sample_gradients", "sample-grads", "{:.0f}"), ("denoise_sample_nfe", "denoise sample-NFE", "{:.0f}"),
            ("train_seconds", "train s", "{:.0f}")]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, figs in summary.items():
        cells = []
        for k, _, fmt in cols:
            if k in figs:
                mean, sd, _ = figs[k]
                cells.append(fmt.format(mean) + (" ± " + fmt.format(sd) if sd == sd and sd > 0 else ""))
            else:
                cells.append("–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def start_ray(attempts: int = 3) -> None:
    """Start the local Ray once for every run; a loaded machine can time out Ray's dashboard start, so retry."""
    import ray

    from pipeline.train.trainer import init_ray

    for attempt in range(1, attempts + 1):
        try:
            init_ray()
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for a dashboard that did not start
            print(f"[bench] Ray did not start (attempt {attempt}/{attempts}): {str(exc).strip()[:200]}", flush=True)
            ray.shutdown()
            if attempt == attempts:
                raise
            time.sleep(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench_privacy"))
    p.add_argument("--overwrite", action="store_true", help="delete --out first (results always start from scratch)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "privacy" / "results.json")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=800, help="SFBD flow's steps; the others get its sample-gradients")
    p.add_argument("--batch", type=int, default=64, help="per worker")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--select-points", type=int, default=8, help="clean-only checkpoints scored for early stopping")
    p.add_argument("--sampler-steps", type=int, default=16, help="Heun steps of every generated sample (fd, audit)")
    p.add_argument("--denoise-steps", type=int, default=40, help="SFBD flow's Heun steps per pool refresh")
    p.add_argument("--audit-denoise-steps", type=int, default=20)
    p.add_argument("--noise-std", type=float, default=0.59)
    p.add_argument("--clean-fraction", type=float, default=0.04)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--audit-samples", type=int, default=300)
    p.add_argument("--methods", default=",".join(METHODS), help=f"sfbd_flow first; also: {', '.join(OPTIONAL)}")
    p.add_argument("--table", type=Path, help="only print the table and claim of an existing results.json")
    p.add_argument("--merge", type=Path, nargs="+", help="combine the rows of results.json files from runs of "
                   "disjoint --seeds (same settings) into --results")
    args = p.parse_args(argv)
    if args.merge:
        docs = [json.loads(m.read_text()) for m in args.merge]
        rows = [r for d in docs for r in d["rows"]]
        seen = [(r["method"], r["seed"]) for r in rows]
        if len(seen) != len(set(seen)):
            raise SystemExit("--merge: the files share a (method, seed) row; run disjoint --seeds")
        keep = ("seeds", "out", "results")
        if len({json.dumps({k: v for k, v in d["settings"].items() if k not in keep}, sort_keys=True)
                for d in docs}) != 1:
            raise SystemExit("--merge: the files were made with different settings")
        summary = summarize(rows)
        merged = {**docs[0], "settings": {**docs[0]["settings"], "seeds": ",".join(sorted({str(r["seed"]) for r in rows}))},
                  "merged_from": [str(m) for m in args.merge], "summary": summary,
                  "claim_sfbd_flow_beats": claim(summary), "rows": rows,
                  "elapsed_seconds": [d["elapsed_seconds"] for d in docs]}
        args.results.write_text(json.dumps(merged, indent=2))
        print(table(summary))
        print(f"claim: {claim(summary)}")
        return 0
    if args.table is not None:
        rows = json.loads(args.table.read_text())["rows"]
        print(table(summarize(rows)))
        print(f"claim: {claim(summarize(rows))}")
        return 0
    args.out = args.out.resolve()
    args.methods = args.methods.split(",")
    if args.methods[0] != "sfbd_flow":
        raise SystemExit("--methods must start with sfbd_flow (its sample-gradients set every other budget)")
    if args.out.exists() and any(args.out.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"--out {args.out} is not empty; pass --overwrite to regenerate from scratch")
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)

    from pipeline.data.sources import write_digits

    t_start = time.time()
    version = code_version()
    fd = FrechetDigits(args.per_class)  # trains and caches the classifier once, before any model
    write_digits(args.out / "data", samples_per_shard=256)
    start_ray()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    rows: list[dict[str, Any]] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows += run_seed(args, seed, fd, version)
        summary = summarize(rows)
        doc = {"settings": settings, "code_version": version, "python": platform.python_version(),
               "torch": torch.__version__, "elapsed_seconds": time.time() - t_start, "summary": summary,
               "claim_sfbd_flow_beats": claim(summary), "rows": rows}
        for path in (args.out / "results.json", args.results):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=2))
    print(table(summarize(rows)), flush=True)
    print(f"[bench] claim: {claim(summarize(rows))}; total {time.time() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
