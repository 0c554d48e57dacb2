"""Privacy benchmark on digits: does SFBD (flow) earn its place? One command runs every part and rewrites
RESULTS.md:

    nice -n 10 python benchmarks/privacy/run.py --out runs/bench_privacy --overwrite --part all

Protocol per cell (clean fraction c, noise s) and training seed k (REFERENCE.md 7 and 11b):

1. Release: the digits train split (1438 images, 8x8) copied to ``sensitive``, marked sensitive; a consent list of
   a random fraction c of its keys (seed k) inside its fence; released once at s (fresh secret and release id).
2. Warm-up = ``clean_only``: the clean set alone for ``--warmup-budget`` steps, a checkpoint every
   ``--select-every`` steps, each scored on the validation half (fd_digits against the even-indexed val images). The
   warm-up's plateau is the best point once ``--patience`` later points failed to improve it by ``--plateau-tol``
   (no plateau within the budget: exit 2). ``clean_only``'s row is that run early-stopped; its compute is the
   warm-up budget, which may be less than the others' (past its plateau more steps do not help it).
3. ``sfbd_flow`` from the plateau checkpoint (``init_from``): the pool refreshed in chunks so the whole pool is
   re-denoised every ``--pool-period`` steps, for ``--redenoise`` periods (every copy re-denoised that many times).
4. ``sfbd`` (plain): from the same checkpoint, ``--rounds`` rounds of denoise-all -> fine-tune, FLOP-matched.
5. ``noisy_only``: from scratch on the noisy copies, FLOP-matched.
   Compute is matched in FLOPs (forward + backward + denoising, counted; benchmarks/privacy/protocol.py): the budget
   is SFBD flow's, its warm-up included. Every method is early-stopped the same way on the validation half and
   scored once on the test half (odd-indexed val images), with ``flowrail privacy audit`` on the kept checkpoint.
6. Reference rows, same metric: real images, the oracle posterior mean E[x | y], the consented images replayed, the
   noisy copies, a per-class Gaussian deconvolution (benchmarks/privacy/references.py).

Parts: ``main`` (4% consented, s = 0.59, seeds 0,1,2: mean ± sd), ``frontier`` (one seed, clean fraction x s grid,
fd against the consented-copy rate, a PNG logged to MLflow and written beside RESULTS.md), ``mixture`` (the exact
check on a Gaussian mixture, benchmarks/privacy/mixture.py). Settings are chosen on the validation half only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
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

from benchmarks.privacy import protocol as P  # noqa: E402
from benchmarks.privacy import references as R  # noqa: E402

METHODS = ["clean_only", "sfbd_flow", "sfbd", "noisy_only"]  # clean_only first: it is the warm-up
REFERENCES = ["real_images", "oracle_posterior_mean", "consented_replayed", "noisy_copies", "gaussian_deconvolution"]
DIGITS_TRAIN = 1438
SUMMARY = ["fd_test", "fd_select", "classifier_accuracy", "selected_step", "steps", "flops", "sample_gradients",
           "denoise_sample_nfe", "audit_gen_released_extracted_frac", "audit_gen_released_extracted_upper95",
           "audit_gen_consented_extracted_frac", "audit_gen_carlini_ratio_median", "audit_gen_released_nn_l2_p05",
           "audit_floor_nn_l2_p05", "audit_passed", "train_seconds"]


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


def overrides(args: argparse.Namespace, cell: dict[str, Any], seed_dir: Path, method: str, seed: int, steps: int,
              every: int, extra: dict[str, Any] | None = None) -> list[str]:
    o = {
        "run_name": f"bench-{method}", "run_dir": str(seed_dir / "runs"), "privacy.release": str(seed_dir / "release"),
        "privacy.method": method, "data.batch_size": args.batch, "model.hidden_size": 64, "model.depth": 3,
        "model.num_heads": 4, "model.patch_size": 2, "train.num_workers": args.workers, "train.zero_stage": 2,
        "train.steps": steps, "train.lr": 2e-3, "train.ema_decay": 0.99, "train.log_every": every,
        "train.checkpoint_every": every, "train.keep_checkpoints": 1000, "sampler.solver": "heun",
        "sampler.steps": args.sampler_steps, "seed": seed, "privacy.warmup_steps": 0,
        "privacy.denoise_steps": args.denoise_steps, "tracking.experiment": "privacy-benchmark",
    }
    o.update(extra or {})
    return [f"{k}={v}" for k, v in o.items()]


class FrechetDigits:
    """fd_digits of images (or of a checkpoint's samples, ``per_class`` per class) against one half of the digits
    val split: ``select`` (even-indexed, for early stopping) or ``test`` (odd-indexed, scored once)."""

    def __init__(self, per_class: int) -> None:
        from evals.digits_classifier import digits_images, load_digits_classifier

        self.clf = load_digits_classifier()
        self.per_class = per_class
        xv, _ = digits_images("val")
        feats = self.clf.features(xv).numpy()
        self.halves = {"select": feats[0::2], "test": feats[1::2]}

    def images(self, x: torch.Tensor, labels: torch.Tensor, half: str) -> tuple[float, float]:
        from evals.frechet import frechet_distance

        f_gen = self.clf.features(x.float().clamp(-1, 1)).numpy()
        ref = self.halves[half]
        fd = frechet_distance(f_gen.mean(0), np.cov(f_gen, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))
        acc = float((self.clf.predict(x) == labels).double().mean()) if bool((labels >= 0).all()) else float("nan")
        return float(fd), acc

    def __call__(self, checkpoint: Path, seed: int, half: str) -> tuple[float, float]:
        from pipeline.sampling import sample_classes
        from pipeline.train.checkpoint import load_trained

        trained = load_trained(checkpoint)
        labels = torch.arange(10).repeat_interleave(self.per_class)
        with torch.no_grad():
            x = sample_classes(trained, labels, seed).x.float().clamp(-1, 1)
        return self.images(x, labels, half)


def all_checkpoints(run_root: Path) -> list[Path]:
    from pipeline.train.checkpoint import META, is_complete

    found = [m.parent for m in run_root.rglob(META) if is_complete(m.parent)]
    return sorted(found, key=lambda p: json.loads((p / META).read_text())["step"])


def step_of(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "flowrail.json").read_text())["step"])


def prepare_seed(args: argparse.Namespace, cell_dir: Path, seed: int, clean_fraction: float,
                 noise_std: float) -> tuple[Path, Path, dict[str, Any]]:
    """A fresh sensitive copy, its consent list (inside the fence) and its release."""
    from pipeline.data.shards import iter_samples
    from privacy.boundary import mark_sensitive
    from privacy.release import release

    seed_dir = cell_dir / f"seed{seed}"
    sensitive = seed_dir / "sensitive"
    # each (cell, seed) stands for an independent sensitive set: its own privacy ledger (the release, the training
    # and the audit of this seed use it), else the ledger refuses the second release of the same digits images
    os.environ["FLOWRAIL_PRIVACY_LEDGER"] = str(seed_dir / "ledger")
    shutil.copytree(args.out / "data" / "train", sensitive)
    keys = [k for k, _ in iter_samples(sensitive)]  # read before the fence closes
    mark_sensitive(sensitive)
    rng = np.random.default_rng(1000 + seed)
    chosen = sorted(keys[i] for i in rng.permutation(len(keys))[:int(round(clean_fraction * len(keys)))])
    consent = sensitive / "consent.txt"
    consent.write_text("\n".join(chosen) + "\n")
    rel = release(sensitive, seed_dir / "release", noise_std, consent_list=consent, release_labels=True,
                  samples_per_shard=256, allow_large_clean_fraction=clean_fraction > 0.10)  # the frontier's 25%
    return seed_dir, sensitive, rel.manifest


def train(args: argparse.Namespace, cell: dict[str, Any], seed_dir: Path, method: str, seed: int, steps: int,
          extra: dict[str, Any] | None = None, attempts: int = 3) -> tuple[Any, float, int]:
    """One training run from scratch; a run that fails (e.g. a worker killed by the host's memory monitor on a
    shared machine) is restarted from scratch under a new run name, so the compute counts stay exact."""
    from pipeline.config import load_config
    from privacy.config import PrivacyTrainConfig
    from privacy.train import fit_privacy

    every = min(args.select_every, steps)
    for attempt in range(1, attempts + 1):
        t0 = time.time()
        o = overrides(args, cell, seed_dir, method, seed, steps, every, extra)
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


def validation_curve(fd: FrechetDigits, run_checkpoint: Path) -> list[tuple[int, float, Path]]:
    """Every checkpoint of a run scored on the validation half."""
    return [(step_of(ck), fd(ck, seed=1, half="select")[0], ck) for ck in all_checkpoints(Path(run_checkpoint).parent)]


def score_run(args: argparse.Namespace, fd: FrechetDigits, res: Any, sensitive: Path, seed_dir: Path,
              f_forward: float, flops_before: float = 0.0) -> dict[str, Any]:
    """Early stopping on the validation half, then the test half and the audit on the kept checkpoint."""
    from privacy.audit_run import audit_checkpoint

    curve = validation_curve(fd, res.checkpoint)
    step, f_sel = P.best_point([(s, f) for s, f, _ in curve])
    kept = next(ck for s, _, ck in curve if s == step)
    m = res.metrics
    row: dict[str, Any] = {"selected_step": step, "fd_select": f_sel, "fd_select_curve": [[s, f] for s, f, _ in curve],
                           "sample_gradients": float(m["sample_gradients"]),
                           "denoise_sample_nfe": float(m["denoise_sample_nfe"]), "mlflow_run_id": res.run_id,
                           "flops": flops_before + P.run_flops(f_forward, m["sample_gradients"],
                                                               m["denoise_sample_nfe"])}
    row["fd_test"], row["classifier_accuracy"] = fd(kept, seed=1, half="test")
    audit = audit_checkpoint(kept, sensitive, release=seed_dir / "release", num_samples=args.audit_samples, seed=2,
                             denoise_steps=args.audit_denoise_steps)
    row.update({f"audit_{k}": v for k, v in audit.items() if k not in ("mlflow_run_id",)})
    return row


def reference_rows(args: argparse.Namespace, fd: FrechetDigits, seed_dir: Path, s: float,
                   seed: int) -> list[dict[str, Any]]:
    """The reference rows of one release (no training)."""
    release_dir, n = seed_dir / "release", args.per_class
    sets = {"real_images": R.per_class_subset(*R.real_images(), n, seed),
            "oracle_posterior_mean": R.per_class_subset(*R.oracle_posterior_mean(release_dir, s), n, seed),
            "consented_replayed": R.per_class_subset(*R.consented_replayed(release_dir), n, seed, replace=True),
            "noisy_copies": R.per_class_subset(*R.noisy_copies(release_dir), n, seed),
            "gaussian_deconvolution": R.gaussian_deconvolution(release_dir, s, n, seed)}
    rows = []
    for name, (x, y) in sets.items():
        f_test, acc = fd.images(x, y, "test")
        rows.append({"method": name, "reference": True, "fd_test": f_test, "classifier_accuracy": acc})
    return rows


def run_cell(args: argparse.Namespace, fd: FrechetDigits, version: str, cell: dict[str, Any], seed: int,
             methods: list[str]) -> list[dict[str, Any]]:
    """Every method and reference row of one (clean fraction, s, seed)."""
    from pipeline.train.checkpoint import load_trained

    c, s = cell["clean_fraction"], cell["noise_std"]
    cell_dir = args.out / f"c{c:g}_s{s:g}"
    seed_dir, sensitive, rel = prepare_seed(args, cell_dir, seed, c, s)
    print(f"[bench] c={c:g} s={s:g} seed {seed}: release {rel['counts']}", flush=True)
    bw = args.batch * args.workers
    base = {"cell": f"c={c:g} s={s:g}", "clean_fraction": c, "noise_std": s, "seed": seed, "code_version": version}
    rows = []

    def add(method: str, res: Any, seconds: float, attempts: int, steps: int, row: dict[str, Any]) -> None:
        rows.append({**base, "method": method, "steps": steps, "train_seconds": seconds, "attempts": attempts, **row})
        r = rows[-1]
        print(f"[bench] {base['cell']} seed {seed} {method}: step {r['selected_step']}/{steps}  fd_select "
              f"{r['fd_select']:.2f}  fd_test {r['fd_test']:.2f}  GFLOPs {r['flops'] / 1e9:.1f}  consented-copies "
              f"{r['audit_gen_consented_extracted_frac']:.3f}  ({seconds:.0f}s)", flush=True)

    # 1. warm-up = clean_only, to its validation plateau
    res, seconds, attempts = train(args, cell, seed_dir, "clean_only", seed, args.warmup_budget)
    curve = validation_curve(fd, res.checkpoint)
    plateau = P.plateau_step([(st, f) for st, f, _ in curve], args.patience, args.plateau_tol, args.warmup_budget)
    warm = next(ck for st, _, ck in curve if st == plateau)
    trained = load_trained(warm)
    f_forward = P.forward_flops(trained.model, trained.data.channels, trained.data.size, trained.data.num_classes)
    warm_flops = P.run_flops(f_forward, plateau * bw, 0)
    row = score_run(args, fd, res, sensitive, seed_dir, f_forward)
    add("clean_only", res, seconds, attempts, args.warmup_budget,
        {**row, "warmup_plateau_step": plateau, "forward_flops": f_forward})
    # 2. SFBD flow from the plateau: the whole pool re-denoised every period, --redenoise periods
    n_noisy = int(rel["counts"].get("noisy", DIGITS_TRAIN - round(c * DIGITS_TRAIN)))
    refresh = P.pool_refresh(math.ceil(n_noisy / args.workers), args.refresh_every, args.pool_period,
                             args.redenoise, args.refresh_size)
    budget = None
    if "sfbd_flow" in methods:
        extra = {"init_from": str(warm), "privacy.refresh_every": refresh.every, "privacy.refresh_size": refresh.size,
                 "privacy.ramp_end": max(1, int(refresh.steps * args.ramp_frac))}
        res, seconds, attempts = train(args, cell, seed_dir, "sfbd_flow", seed, refresh.steps, extra)
        row = score_run(args, fd, res, sensitive, seed_dir, f_forward, warm_flops)
        budget = row["flops"]
        add("sfbd_flow", res, seconds, attempts, refresh.steps,
            {**row, "refresh_size": refresh.size, "refresh_every": refresh.every, "pool_period": refresh.period,
             "redenoised_per_copy": refresh.redenoised, "warmup_plateau_step": plateau})
    # 3. plain SFBD, FLOP-matched: rounds x (denoise all n_noisy copies) + two batches per step
    if "sfbd" in methods and budget is not None:
        nfe = 2 * args.denoise_steps  # Heun
        denoise_flops = f_forward * args.rounds * n_noisy * nfe
        steps = max(args.rounds, int((budget - warm_flops - denoise_flops) / (3 * f_forward * 2 * bw)))
        res, seconds, attempts = train(args, cell, seed_dir, "sfbd", seed, steps,
                                       {"init_from": str(warm), "privacy.rounds": args.rounds})
        add("sfbd", res, seconds, attempts, steps,
            score_run(args, fd, res, sensitive, seed_dir, f_forward, warm_flops))
    # 4. noisy-only from scratch, FLOP-matched
    if "noisy_only" in methods and budget is not None:
        steps = P.steps_for_flops(budget, f_forward, bw)
        res, seconds, attempts = train(args, cell, seed_dir, "noisy_only", seed, steps)
        add("noisy_only", res, seconds, attempts, steps, score_run(args, fd, res, sensitive, seed_dir, f_forward))
    rows += [{**base, **r} for r in reference_rows(args, fd, seed_dir, s, seed)]
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """mean and sample sd (ddof 1) of every SUMMARY figure per method: {method: {figure: [mean, sd, n]}}."""
    out: dict[str, dict[str, list[float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out[method] = {}
        for k in SUMMARY:
            v = np.array([float(r[k]) for r in mine if isinstance(r.get(k), (int, float, bool))], dtype=np.float64)
            if len(v):
                out[method][k] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)]
    return out


def targets(summary: dict[str, dict[str, list[float]]]) -> dict[str, str]:
    """The issue's targets at 4% / s = 0.59, each "met", "missed" or "not measured"."""
    def fig(method: str, key: str) -> list[float] | None:
        return summary.get(method, {}).get(key)

    out = {}
    flow, noisy = fig("sfbd_flow", "fd_test"), fig("noisy_only", "fd_test")
    out["sfbd_flow fd_test <= 10"] = "not measured" if flow is None else ("met" if flow[0] <= 10 else "missed")
    if flow is None or noisy is None or flow[2] < 2 or noisy[2] < 2:
        out["sfbd_flow better than noisy_only by > 2 sd"] = "not measured (fewer than 2 seeds)"
    else:
        sd = max(flow[1], noisy[1])
        out["sfbd_flow better than noisy_only by > 2 sd"] = "met" if noisy[0] - flow[0] > 2 * sd else "missed"
    up = fig("sfbd_flow", "audit_gen_released_extracted_upper95")
    ext = fig("sfbd_flow", "audit_gen_released_extracted_frac")
    out["0 released-image extractions, 95% bound < 1%"] = ("not measured" if up is None or ext is None else
                                                          "met" if ext[0] == 0 and up[0] < 0.01 else "missed")
    cons = fig("sfbd_flow", "audit_gen_consented_extracted_frac")
    out["consented-copy rate <= 5%"] = "not measured" if cons is None else ("met" if cons[0] <= 0.05 else "missed")
    return out


def table(summary: dict[str, dict[str, list[float]]]) -> str:
    cols = [("fd_test", "fd_digits (test half) ↓", "{:.2f}"), ("fd_select", "fd (val half, kept)", "{:.2f}"),
            ("classifier_accuracy", "class acc", "{:.3f}"), ("selected_step", "kept step", "{:.0f}"),
            ("steps", "steps", "{:.0f}"), ("flops", "GFLOPs", "{:.1f}"),
            ("denoise_sample_nfe", "denoise sample-NFE", "{:.3g}"),
            ("audit_gen_released_extracted_frac", "extracted: released", "{:.3f}"),
            ("audit_gen_released_extracted_upper95", "released 95% bound", "{:.3f}"),
            ("audit_gen_consented_extracted_frac", "consented-copy rate", "{:.3f}"),
            ("audit_gen_released_nn_l2_p05", "NN l2 p05 to released", "{:.3f}"),
            ("audit_passed", "audit passed", "{:.2f}"), ("train_seconds", "train s", "{:.0f}")]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, figs in summary.items():
        cells = []
        for k, _, fmt in cols:
            if k in figs:
                mean, sd, _ = figs[k]
                value = mean / 1e9 if k == "flops" else mean
                sdv = sd / 1e9 if k == "flops" else sd
                cells.append(fmt.format(value) + (" ± " + fmt.format(sdv) if sdv == sdv and sdv > 0 else ""))
            else:
                cells.append("–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_png(rows: list[dict[str, Any]], path: Path) -> Path:
    """fd_digits (test half) against the consented-copy rate, one point per (cell, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, marker in (("sfbd_flow", "o"), ("clean_only", "s"), ("sfbd", "^"), ("noisy_only", "x")):
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        ax.scatter([r["audit_gen_consented_extracted_frac"] for r in mine], [r["fd_test"] for r in mine],
                   marker=marker, label=method)
        for r in mine:
            ax.annotate(r["cell"], (r["audit_gen_consented_extracted_frac"], r["fd_test"]), fontsize=6)
    ax.set_xlabel("consented-copy rate (audit)")
    ax.set_ylabel("fd_digits, test half ↓")
    ax.set_title("privacy frontier on digits (one seed per cell)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_png(path: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> str | None:
    """The frontier PNG as an artifact of its own MLflow run in the benchmark's experiment."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config, tracking_uri
    from privacy.config import PrivacyTrainConfig

    uri = tracking_uri(load_config(PrivacyTrainConfig, None, [f"run_dir={args.out / 'frontier-log'}"]).base())
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("privacy-benchmark")
    exp_id = exp.experiment_id if exp is not None else client.create_experiment("privacy-benchmark")
    run = client.create_run(exp_id, run_name="privacy-frontier")
    client.log_artifact(run.info.run_id, str(path), artifact_path="frontier")
    client.set_terminated(run.info.run_id)
    return f"{uri} run {run.info.run_id}"


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str))


def run_part(args: argparse.Namespace, part: str, fd: FrechetDigits, version: str) -> dict[str, Any]:
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    if part == "main":
        cell = {"clean_fraction": args.clean_fraction, "noise_std": args.noise_std}
        for seed in args.seed_list:
            rows += run_cell(args, fd, version, cell, seed, args.methods)
    else:
        for c in args.frontier_fractions:
            for s in args.frontier_noise:
                rows += run_cell(args, fd, version, {"clean_fraction": c, "noise_std": s}, args.frontier_seed,
                                 args.frontier_methods)
    doc = {"part": part, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "code_version": version, "python": platform.python_version(), "torch": torch.__version__,
           "wall_seconds": time.time() - t0, "rows": rows}
    if part == "main":
        doc["summary"] = summarize(rows)
        doc["targets"] = targets(doc["summary"])
    else:
        png = frontier_png([r for r in rows if not r.get("reference")], args.results_dir / "frontier.png")
        doc["png"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
        doc["mlflow"] = log_png(png, rows, args)
    return doc


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench_privacy"))
    p.add_argument("--overwrite", action="store_true", help="delete --out first (results always start from scratch)")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "privacy",
                   help="where results.json, frontier.json, mixture.json, frontier.png and RESULTS.md go")
    p.add_argument("--part", choices=["main", "frontier", "mixture", "all", "report"], default="all",
                   help="report: only rewrite RESULTS.md from the stored results")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batch", type=int, default=64, help="per worker")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--clean-fraction", type=float, default=0.04)
    p.add_argument("--noise-std", type=float, default=0.59)
    p.add_argument("--methods", default=",".join(METHODS), help="clean_only (the warm-up) always runs first")
    p.add_argument("--warmup-budget", type=int, default=2000, help="most steps of the clean-only warm-up")
    p.add_argument("--select-every", type=int, default=100, help="steps between validation points (every method)")
    p.add_argument("--patience", type=int, default=4, help="validation points without improvement: a plateau")
    p.add_argument("--plateau-tol", type=float, default=0.02, help="relative fd improvement that counts")
    p.add_argument("--pool-period", type=int, default=200, help="SFBD flow: steps to re-denoise the whole pool")
    p.add_argument("--refresh-every", type=int, default=20, help="SFBD flow: steps between chunk refreshes")
    p.add_argument("--refresh-size", type=int, default=None, help="SFBD flow: copies per refresh (default: derived)")
    p.add_argument("--redenoise", type=int, default=10, help="SFBD flow: times every copy is re-denoised")
    p.add_argument("--ramp-frac", type=float, default=0.1, help="SFBD flow: denoised weight reaches 1 here")
    p.add_argument("--rounds", type=int, default=5, help="plain SFBD: denoise-all -> fine-tune rounds")
    p.add_argument("--sampler-steps", type=int, default=16, help="Heun steps of every generated sample (fd, audit)")
    p.add_argument("--denoise-steps", type=int, default=20, help="Heun steps per denoising")
    p.add_argument("--audit-denoise-steps", type=int, default=20)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--audit-samples", type=int, default=300)
    p.add_argument("--frontier-fractions", default="0.04,0.10,0.25")
    p.add_argument("--frontier-noise", default="0.2,0.59,1.0")
    p.add_argument("--frontier-seed", type=int, default=0)
    p.add_argument("--frontier-methods", default="clean_only,sfbd_flow")
    p.add_argument("--mixture-args", default="", help="extra arguments for benchmarks/privacy/mixture.py")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    args.methods = args.methods.split(",")
    args.frontier_methods = args.frontier_methods.split(",")
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.frontier_fractions = [float(v) for v in args.frontier_fractions.split(",")]
    args.frontier_noise = [float(v) for v in args.frontier_noise.split(",")]
    unknown = [m for m in args.methods + args.frontier_methods if m not in METHODS]
    if unknown or args.methods[0] != "clean_only" or args.frontier_methods[0] != "clean_only":
        raise P.BenchInputError(f"--methods / --frontier-methods: {','.join(unknown) or 'clean_only'} "
                                f"(allowed: {', '.join(METHODS)}, clean_only first: it is the warm-up)")
    cells = [(args.clean_fraction, args.methods)] if args.part in ("main", "all") else []
    if args.part in ("frontier", "all"):
        cells += [(c, args.frontier_methods) for c in args.frontier_fractions]
    for c, methods in cells:  # every cell's settings are refused before anything runs
        P.check_settings(argparse.Namespace(**{**vars(args), "clean_fraction": c, "methods": methods}))
        P.pool_refresh(math.ceil((DIGITS_TRAIN - round(c * DIGITS_TRAIN)) / args.workers), args.refresh_every,
                       args.pool_period, args.redenoise, args.refresh_size)
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmarks.privacy.report import write_results_md

    try:
        args = parse(argv)
    except P.BenchInputError as exc:
        print(f"benchmarks/privacy/run.py: {exc}", file=sys.stderr)
        return 2
    results = args.results_dir
    if args.part == "report":
        write_results_md(results)
        return 0
    args.out = args.out.resolve()
    if args.out.exists() and any(args.out.iterdir()):
        if not args.overwrite:
            print(f"benchmarks/privacy/run.py: --out {args.out} is not empty; pass --overwrite", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    parts = ["main", "mixture", "frontier"] if args.part == "all" else [args.part]
    version = code_version()
    try:
        if "mixture" in parts:
            t0 = time.time()
            from benchmarks.privacy import mixture

            mix_args = ["--out", str(args.out / "mixture"), *args.mixture_args.split()]
            if mixture.main(mix_args) != 0:
                return 2
            doc = json.loads((args.out / "mixture" / "mixture.json").read_text())
            write_doc(results / "mixture.json", {**doc, "code_version": version, "wall_seconds": time.time() - t0})
        if {"main", "frontier"} & set(parts):
            from pipeline.data.sources import write_digits

            fd = FrechetDigits(args.per_class)  # trains and caches the classifier once, before any model
            write_digits(args.out / "data", samples_per_shard=256)
            start_ray()
            for part in (p for p in ("main", "frontier") if p in parts):
                doc = run_part(args, part, fd, version)
                write_doc(results / ("results.json" if part == "main" else "frontier.json"), doc)
                if part == "main":
                    print(table(doc["summary"]), flush=True)
    except P.BenchInputError as exc:
        print(f"benchmarks/privacy/run.py: {exc}", file=sys.stderr)
        return 2
    write_results_md(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
