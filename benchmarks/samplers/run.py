"""Sample error vs NFE for every sampler on a closed-form flow (2-D Gaussian mixture, exact velocity/score).

For each sampler and step count: NFE (counted), per-sample final-state error against a high-accuracy solution of
the same ODE from the same noise (ODE samplers), the exact-law squared MMD and the mean/covariance errors of the
samples (all samplers), the worst sample's state error (ODE), the largest second moment of the state over the
steps (SDE; SBDM's first step is the stiff one), and wall time per sample. Writes ``results.csv``, ``RESULTS.md``
(table) and ``error_vs_nfe.png`` into ``--out``.

    python -m benchmarks.samplers.run --out benchmarks/samplers
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import platform
import sys
import time
from pathlib import Path

import torch

from pipeline.config import SamplerConfig, TransportConfig
from pipeline.transport import build_sampler, build_transport
from pipeline.transport.gaussian_mixture import GaussianMixture
from pipeline.transport.ode import integrate

ODE = ["euler", "heun", "midpoint", "rk4", "pseudo_corrector"]
NFE_TARGETS = [4, 8, 16, 32, 64, 128, 256]
PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}
DOPRI_TOLS = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8]
SDE = [("euler", "sigma"), ("euler", "sbdm"), ("heun", "sigma"), ("euler", "constant")]


def steps_for(solver: str, nfe: int) -> int | None:
    if solver == "pseudo_corrector":
        return nfe - 1 if nfe > 1 else None
    steps = nfe // PER_STEP[solver]
    return steps if steps >= 1 else None


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    gm = GaussianMixture.default_2d()
    tr = build_transport(TransportConfig(path=args.path))
    fn = gm.model_fn(tr.path, "velocity")
    x0 = torch.randn(args.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(args.seed))
    t0, t1 = tr.sample_interval()
    ref = integrate(lambda t, x: gm.velocity(tr.path, x, t), x0, "dopri5", t0, t1, atol=1e-10, rtol=1e-10)
    rows: list[dict] = []

    def record(kind: str, name: str, setting: str, cfg: SamplerConfig, deterministic: bool) -> None:
        sampler = build_sampler(tr, cfg)
        start = time.perf_counter()
        out = sampler.sample(fn, x0, generator=torch.Generator().manual_seed(args.seed + 1))
        wall = time.perf_counter() - start
        x = out.x
        max_m2 = float("nan")
        if kind == "sde":  # the same draw again, watching every step's state
            states = sampler.trajectory(fn, x0, generator=torch.Generator().manual_seed(args.seed + 1))
            max_m2 = max(float(s.pow(2).sum(1).mean()) for s in states)
        err = (x - ref).norm(dim=1)
        rows.append({
            "kind": kind, "sampler": name, "setting": setting, "nfe": out.nfe,
            "state_error": float(err.mean()) if deterministic else float("nan"),
            "worst_error": float(err.max()) if deterministic else float("nan"),
            "max_second_moment": max_m2,
            "mmd2": gm.mmd2(x[: args.mmd_n]),
            "mean_error": float((x.mean(0) - gm.mean()).norm()),
            "cov_error": float((torch.cov(x.T) - gm.cov()).norm()),
            "us_per_sample": 1e6 * wall / args.n,
        })
        print(f"{kind:3s} {name:24s} {setting:12s} nfe={out.nfe:4d} err={rows[-1]['state_error']:.2e} "
              f"mmd2={rows[-1]['mmd2']:.1e}", flush=True)

    for solver in ODE:
        for nfe in NFE_TARGETS:
            steps = steps_for(solver, nfe)
            if steps:
                record("ode", solver, f"steps={steps}", SamplerConfig(solver=solver, steps=steps), True)
    for tol in DOPRI_TOLS:
        record("ode", "dopri5", f"tol={tol:g}", SamplerConfig(solver="dopri5", atol=tol, rtol=tol), True)
    for solver, diffusion in SDE:
        for nfe in NFE_TARGETS[2:]:
            steps = (nfe - 1) // (2 if solver == "heun" else 1)
            cfg = SamplerConfig(method="sde", solver=solver, steps=steps, diffusion=diffusion, last_step="euler")
            record("sde", f"{solver}/{diffusion}", f"steps={steps}", cfg, False)
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    a, sig = tr.path.alpha(t), tr.path.sigma(t)
    args.m2_bound = float((a**2 * (torch.trace(gm.cov()) + gm.mean().pow(2).sum()) + 2 * sig**2).max())
    floor = [abs(gm.mmd2(gm.sample(args.mmd_n, torch.Generator().manual_seed(1000 + i)))) for i in range(5)]
    args.mmd_floor = max(floor)
    return rows


def write(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    for name in names:
        rs = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in rs]
        style = "-o" if rs[0]["kind"] == "ode" else "--s"
        if rs[0]["kind"] == "ode":
            ax1.loglog(nfe, [r["state_error"] for r in rs], style, ms=3, label=name)
        ax2.semilogx(nfe, [r["mmd2"] for r in rs], style, ms=3, label=name)
    ax1.set(xlabel="NFE", ylabel="mean |x - x_ref| per sample", title=f"ODE: final-state error ({args.path} path)")
    ax2.set(xlabel="NFE", ylabel="MMD^2 to the exact law", title="all samplers: distance to the target law")
    ax2.set_yscale("symlog", linthresh=1e-4)
    ax2.axhspan(-args.mmd_floor, args.mmd_floor, color="grey", alpha=0.2, label="exact samples (max |MMD^2|, 5 draws)")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "error_vs_nfe.png", dpi=110)

    cmd = "python -m benchmarks.samplers.run " + " ".join(sys.argv[1:])
    lines = [
        "# Sampler benchmark: error vs NFE on a closed-form flow",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        (f"- machine: {platform.machine()} {platform.processor() or ''} {platform.system()}, "
         f"torch {torch.__version__}, {args.threads} thread(s); shared CPU, so wall times are indicative only"),
        f"- command: `{cmd.strip()}`",
        (f"- setup: 2-D Gaussian mixture (3 anisotropic components), exact velocity field on the `{args.path}` "
         f"path, {args.n} samples (float64) from fixed noise; reference = dopri5 at atol = rtol = 1e-10."),
        ("- `state_error`: mean over samples of |x - x_ref| (ODE only, same noise). `mmd2`: squared MMD "
        f"(Gaussian kernel, h = 0.5, unbiased, so it can be < 0) of the first {args.mmd_n} samples to the exact law; "
        f"exact samples of that size score |MMD^2| <= {args.mmd_floor:.1e} (5 draws): below that, sampler error is "
        "not resolved. SDEs: Euler-Maruyama / stochastic Heun to t = 0.96, "
        "then an Euler (ODE) last step; NFE counts it. `worst`: the largest per-sample state error (ODE). "
        f"`max E|x|^2`: the largest mean squared norm of the state over all SDE steps (the marginals' largest "
        f"is {args.m2_bound:.2f})."),
        ("- converged ODE samplers all sit at the same MMD^2 / mean / cov errors: those of the exact push-forward "
         "of this particular noise draw (sampling noise), not solver error; the state error keeps falling."),
        "- plot: `error_vs_nfe.png`; raw numbers: `results.csv`.",
        "",
        "| kind | sampler | setting | NFE | state error | worst | max E\\|x\\|^2 | MMD^2 | mean err | cov err | us/sample |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        se = "-" if r["state_error"] != r["state_error"] else f"{r['state_error']:.2e}"
        we = "-" if r["worst_error"] != r["worst_error"] else f"{r['worst_error']:.2e}"
        m2 = "-" if r["max_second_moment"] != r["max_second_moment"] else f"{r['max_second_moment']:.2f}"
        lines.append(f"| {r['kind']} | {r['sampler']} | {r['setting']} | {r['nfe']} | {se} | {we} | {m2} | {r['mmd2']:.1e} | "
                     f"{r['mean_error']:.3f} | {r['cov_error']:.3f} | {r['us_per_sample']:.1f} |")
    lines += ["", "Observed orders (slope of log state error vs log NFE, last two ODE points):", ""]
    for name in ODE:
        rs = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
        a, b = rs[-2], rs[-1]
        slope = -math.log(b["state_error"] / a["state_error"]) / math.log(b["nfe"] / a["nfe"])
        lines.append(f"- {name}: {slope:.2f}")
    notes = Path(__file__).with_name("NOTES.md")
    if notes.is_file():  # hand-written analysis of the numbers, kept across re-runs
        lines += ["", notes.read_text().strip()]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/samplers")
    p.add_argument("--path", default="linear", choices=["linear", "gvp", "vp", "polynomial", "linear_vp"])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--mmd-n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    rows = run(args)
    write(rows, args, Path(args.out))
    print(f"wrote {args.out}/RESULTS.md, results.csv, error_vs_nfe.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
