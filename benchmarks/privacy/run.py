"""Privacy benchmark on digits: SFBD flow vs SFBD vs clean-only vs noisy-only, with memorization audits.

    python benchmarks/privacy/run.py --out runs/bench_privacy          # ~10 min on 2 CPU cores

Setting (REFERENCE.md 7): the digits train split (1438 images, 8x8) is the sensitive set; it is released once as
noisy copies with s = 0.59 (pixel scale [-1, 1]) and 4% of it is declared consented (the clean subset, 58 images).
Every model is the same small SiT (Linear path, velocity) trained with Ray Train (2 workers, DeepSpeed ZeRO-2) for
the same number of steps. The reference "memorizes" model is trained on the clean sensitive set itself.

Reported per model: fd_digits (Fréchet distance in the evals digits classifier's feature space, 500 samples,
50 per class, against the val split), the classifier's accuracy on them, and the audit of
:mod:`privacy.audit_run` (Carlini extraction, NN l2, max cosine in the classifier's feature space, and for the
models that saw noisy data, the reconstructions of the noisy copies against their originals).
Writes ``results.json`` and ``samples.png`` under --out and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

METHODS = ["clean_only", "noisy_only", "sfbd_flow", "clean_sensitive", "sfbd"]


def finished_checkpoint(out: Path, method: str, steps: int) -> tuple[Path, str | None] | None:
    """A completed run of this method from an earlier invocation (same settings), to skip retraining it."""
    from pipeline.errors import FlowrailError
    from pipeline.train.checkpoint import find_latest, read_meta

    try:
        ckpt = find_latest(out / "runs" / "ray" / f"bench-{method}")
    except FlowrailError:
        return None
    meta = read_meta(ckpt)
    return (ckpt, meta.get("mlflow_run_id")) if meta.get("step") == steps else None


def overrides(args: argparse.Namespace, out: Path, method: str) -> list[str]:
    o = {
        "run_name": f"bench-{method}", "run_dir": str(out / "runs"), "privacy.release": str(out / "release"),
        "privacy.method": "clean_only" if method == "clean_sensitive" else method,
        "data.batch_size": args.batch, "model.hidden_size": 64, "model.depth": 3, "model.num_heads": 4,
        "model.patch_size": 2, "train.num_workers": 2, "train.zero_stage": 2, "train.steps": args.steps,
        "train.lr": 2e-3, "train.ema_decay": 0.99, "train.log_every": 50, "train.checkpoint_every": args.steps,
        "sampler.solver": "heun", "sampler.steps": 16, "seed": 0,
        "privacy.warmup_steps": args.steps // 4, "privacy.rounds": 2, "privacy.refresh_every": 20,
        "privacy.refresh_size": 128, "privacy.ramp_end": args.steps // 2, "privacy.denoise_steps": 40,
        "tracking.experiment": "privacy-benchmark",
    }
    if method == "clean_sensitive":
        o["privacy.clean_shards"] = str(out / "data" / "train")  # the public, unmarked copy of the same images
    return [f"{k}={v}" for k, v in o.items()]


def fd_digits(checkpoint: Path, per_class: int, seed: int) -> tuple[float, float, torch.Tensor]:
    """Fréchet distance to the val split in the digits classifier's feature space, and its accuracy on samples."""
    from evals.digits_classifier import digits_images, load_digits_classifier
    from evals.frechet import frechet_distance
    from pipeline.sampling import sample_classes
    from pipeline.train.checkpoint import load_trained

    clf = load_digits_classifier()  # trains (with grad) and caches on first use
    trained = load_trained(checkpoint)
    labels = torch.arange(10).repeat_interleave(per_class)
    with torch.no_grad():
        x = sample_classes(trained, labels, seed).x.float().clamp(-1, 1)
    f_gen = clf.features(x).numpy()
    xv, _ = digits_images("val")
    f_val = clf.features(xv).numpy()
    fd = frechet_distance(f_gen.mean(0), np.cov(f_gen, rowvar=False), f_val.mean(0), np.cov(f_val, rowvar=False))
    acc = float((clf.predict(x) == labels).double().mean())
    return float(fd), acc, x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_privacy")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="per worker")
    p.add_argument("--audit-denoise-steps", type=int, default=20)
    p.add_argument("--noise-std", type=float, default=0.59)
    p.add_argument("--clean-fraction", type=float, default=0.04)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--audit-samples", type=int, default=300)
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from pipeline.config import load_config
    from pipeline.data.sources import write_digits
    from pipeline.images import save_grid
    from privacy.audit_run import audit_checkpoint
    from privacy.boundary import mark_sensitive
    from privacy.config import PrivacyTrainConfig
    from privacy.release import read_secret, release
    from privacy.train import fit_privacy

    t_start = time.time()
    from evals.digits_classifier import load_digits_classifier

    load_digits_classifier()  # train and cache the feature extractor once, before any model
    if not (out / "data" / "train" / "manifest.json").is_file():
        write_digits(out / "data", samples_per_shard=256)
    sensitive = out / "sensitive"
    if not (sensitive / "manifest.json").is_file():
        shutil.copytree(out / "data" / "train", sensitive)
        mark_sensitive(sensitive)
    secret_file = out / "secret.txt"  # beside the experiment, never inside the release
    if not secret_file.is_file():
        secret_file.write_text(secrets.token_hex(32))
        secret_file.chmod(0o600)
    if not (out / "release" / "release.json").is_file():
        release(sensitive, out / "release", args.noise_std, read_secret(secret_file),
                clean_fraction=args.clean_fraction, samples_per_shard=256)
    rel = json.loads((out / "release" / "release.json").read_text())
    print(f"[bench] release: {rel['counts']}", flush=True)

    results: dict[str, dict] = {}
    grids = []
    for method in args.methods.split(","):
        t0 = time.time()
        done = finished_checkpoint(out, method, args.steps)
        if done is None:
            cfg = load_config(PrivacyTrainConfig, None, overrides(args, out, method))
            res = fit_privacy(cfg, make_grid=False)
            checkpoint, run_id = res.checkpoint, res.run_id
        else:
            checkpoint, run_id = done
        t_train = time.time() - t0
        fd, acc, x = fd_digits(checkpoint, args.per_class, seed=1)
        grids.append(x.view(10, args.per_class, *x.shape[1:])[:, :8].reshape(-1, *x.shape[1:]))
        audit = audit_checkpoint(checkpoint, sensitive,
                                 release=out / "release" if method in ("noisy_only", "sfbd", "sfbd_flow") else None,
                                 num_samples=args.audit_samples, seed=2, denoise_steps=args.audit_denoise_steps)
        results[method] = {"fd_digits": fd, "classifier_accuracy": acc, "train_seconds": t_train,
                           "mlflow_run_id": run_id, "checkpoint": str(checkpoint), "reused": done is not None,
                           **audit}
        print(f"[bench] {method}: fd_digits {fd:.3f}  acc {acc:.3f}  extracted {audit['gen_extracted_frac']:.3f}  "
              f"({t_train:.0f}s)", flush=True)
        (out / "results.json").write_text(json.dumps({"settings": vars(args), "release_counts": rel["counts"],
                                                      "results": results}, indent=2))
    if grids:
        save_grid(torch.cat(grids), out / "samples.png", rows=10 * len(grids),
                  row_labels=[f"{m} {c}" for m in results for c in range(10)])
    print(table(results), flush=True)
    print(f"[bench] total {time.time() - t_start:.0f}s; results in {out / 'results.json'}", flush=True)
    return 0


def table(results: dict[str, dict]) -> str:
    cols = [("fd_digits", "fd_digits ↓", "{:.2f}"), ("classifier_accuracy", "class acc", "{:.3f}"),
            ("gen_extracted_frac", "extracted (Carlini)", "{:.3f}"), ("gen_nn_l2_mean", "NN l2 mean", "{:.3f}"),
            ("gen_nn_l2_p05", "NN l2 p05", "{:.3f}"),
            ("gen_maxcos_digits_classifier_mean", "max cos mean", "{:.3f}"),
            ("gen_maxcos_digits_classifier_frac_gt_0.5", "max cos > 0.5", "{:.3f}"),
            ("pool_recon_own_l2_mean", "recon l2 to own original", "{:.3f}"),
            ("pool_recon_reid_frac", "recon re-id", "{:.3f}"), ("pool_recon_extracted_frac", "recon extracted", "{:.3f}"),
            ("train_seconds", "train s", "{:.0f}")]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, r in results.items():
        cells = [fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "–" for k, _, fmt in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
