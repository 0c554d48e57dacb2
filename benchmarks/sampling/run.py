"""Sampling cost at matched accuracy: NFE and wall time per sample for each sampler.

    python benchmarks/sampling/run.py --repeats 5

Accuracy comes from the closed-form benchmark of #3 (``benchmarks/samplers/results.csv``: a 2-D Gaussian mixture
with its exact velocity on the linear path). For each accuracy target this picks, per sampler, the cheapest
setting of that grid that reaches it:
  ODE samplers, matched final-state error   mean |x - x_ref| <= 1e-2, 1e-3, 1e-4 (x_ref: dopri5 at 1e-10)
  all samplers, matched distribution error  MMD^2 to the exact law <= 1e-3 (exact samples score <= 1.4e-4)
then re-times that setting on this machine (median over ``--repeats``):
  closed form  2000 samples of the mixture (float64): the sampler's own overhead per NFE
  SiT          a batch of 64 16x16x1 images through the default ``train`` config's SiT (random weights; timing
               only): what a step count costs when every NFE is a network evaluation (adaptive dopri5 takes
               its own step count on this model, so its time is scaled to the table's NFE)
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from pathlib import Path

import torch

from pipeline.config import SamplerConfig, TrainJobConfig, TransportConfig, load_config
from pipeline.models import build_model
from pipeline.transport import build_sampler, build_transport
from pipeline.transport.gaussian_mixture import GaussianMixture

CSV = Path(__file__).resolve().parents[1] / "samplers" / "results.csv"
STATE_TARGETS = [1e-2, 1e-3, 1e-4]
MMD_TARGET = 1e-3


def sampler_config(row: dict[str, str]) -> SamplerConfig:
    """The SamplerConfig of one results.csv row."""
    key, _, value = row["setting"].partition("=")
    if row["kind"] == "ode":
        if key == "tol":
            return SamplerConfig(solver="dopri5", atol=float(value), rtol=float(value))
        return SamplerConfig(solver=row["sampler"], steps=int(value))
    solver, diffusion = row["sampler"].split("/")
    return SamplerConfig(method="sde", solver=solver, steps=int(value), diffusion=diffusion, last_step="euler")


def cheapest(rows: list[dict[str, str]], metric: str, target: float) -> dict[str, dict[str, str] | None]:
    """Per sampler, the row of least NFE whose ``metric`` (absolute value) is at most ``target``."""
    out: dict[str, dict[str, str] | None] = {}
    for row in rows:
        name = row["sampler"]
        out.setdefault(name, None)
        value = float(row[metric])
        if math.isnan(value) or abs(value) > target:
            continue
        best = out[name]
        if best is None or int(row["nfe"]) < int(best["nfe"]):
            out[name] = row
    return out


def time_it(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = list(csv.DictReader(CSV.open()))
    tr = build_transport(TransportConfig(path="linear"))
    gm = GaussianMixture.default_2d()
    gm_fn = gm.model_fn(tr.path, "velocity")
    x0 = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = load_config(TrainJobConfig, "train", ["data.image_size=16"])
    torch.manual_seed(0)
    sit = build_model(cfg.model, in_channels=1, input_size=16, num_classes=10).eval()
    y = torch.arange(64) % 10
    xs = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))

    def sit_fn(x: torch.Tensor, t: torch.Tensor, **kw: object) -> torch.Tensor:
        return sit(x, t, y)

    cache: dict[tuple[str, str], tuple[int, float, float]] = {}

    def measure(row: dict[str, str]) -> tuple[int, float, float]:
        key = (row["sampler"], row["setting"])
        if key not in cache:
            sampler = build_sampler(tr, sampler_config(row))
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                gm_s = time_it(lambda: sampler.sample(gm_fn, x0, generator=g), args.repeats)
                sit_s = time_it(lambda: sampler.sample(sit_fn, xs, generator=g), max(1, args.repeats // 2))
                nfe = sampler.sample(gm_fn, x0, generator=g).nfe
                sit_nfe = sampler.sample(sit_fn, xs, generator=g).nfe
            # adaptive dopri5 takes its own number of steps on the (random-weight) SiT: scale to the table's NFE
            cache[key] = (nfe, 1e6 * gm_s / len(x0), 1e3 * sit_s / len(xs) * nfe / max(sit_nfe, 1))
        return cache[key]

    lines = ["| target | sampler | setting | NFE | error reached | closed form (us/sample) | SiT 16px (ms/sample) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for target in STATE_TARGETS:
        best = cheapest([r for r in rows if r["kind"] == "ode"], "state_error", target)
        for name, row in sorted(best.items(), key=lambda kv: int(kv[1]["nfe"]) if kv[1] else 1 << 30):
            if row is None:
                lines.append(f"| state err <= {target:.0e} | {name} | not reached on the grid | - | - | - | - |")
                continue
            nfe, us, ms = measure(row)
            lines.append(f"| state err <= {target:.0e} | {name} | {row['setting']} | {nfe} | "
                         f"{float(row['state_error']):.1e} | {us:.1f} | {ms:.2f} |")
        print("\n".join(lines[-len(best):]), flush=True)
    best = cheapest(rows, "mmd2", MMD_TARGET)
    for name, row in sorted(best.items(), key=lambda kv: int(kv[1]["nfe"]) if kv[1] else 1 << 30):
        if row is None:
            lines.append(f"| MMD^2 <= {MMD_TARGET:.0e} | {name} | not reached on the grid | - | - | - | - |")
            continue
        nfe, us, ms = measure(row)
        lines.append(f"| MMD^2 <= {MMD_TARGET:.0e} | {name} | {row['setting']} | {nfe} | "
                     f"{float(row['mmd2']):.1e} | {us:.1f} | {ms:.2f} |")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
