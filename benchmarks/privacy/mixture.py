"""The exact check of SFBD: deconvolution on a Gaussian mixture whose answer is known.

Data ``x ~ sum_k pi_k N(mu_k, S_k)`` (``GaussianMixture.default_2d``: 3 anisotropic 2-D components, weights
0.5/0.3/0.2); a clean fraction of ``n`` samples is kept as is, the rest is released as ``y = x + s eps`` (s known).
Every method ends in a model whose samples are fitted by EM with 3 full-covariance components; the fit's weights,
means and covariances are compared with the truth (components matched by the permutation closest in means), and the
samples' squared MMD to the true law is exact in its law terms (``GaussianMixture.mmd2``).

Methods (one small MLP velocity field on the Linear path, flow-matching loss, ``--steps`` steps after warm-up):

- ``clean_only``: the clean samples alone; ``noisy_only``: the noisy copies treated as data.
- ``sfbd``: warm-up on the clean set, then ``--rounds`` rounds of denoise-all (reverse probability-flow ODE from
  ``t* = 1 / (1 + s)``, state ``t* y``, :func:`privacy.sfbd.denoise`) → fine-tune on clean ∪ denoised.
- ``sfbd_flow``: warm-up, then the pool refreshed in chunks so each copy is re-denoised ``--redenoise`` times, the
  denoised weight ramping 0 -> 1 over the first half (the same :class:`privacy.sfbd.Schedule` as the stage).
- ``sfbd_exact`` (reference): SFBD with the model a 3-component mixture fitted by EM and denoised with its exact
  velocity field: the deconvolution mechanism without network error. For one Gaussian of variance ``v`` the round
  map is ``u -> u (v + s^2) / (u + s^2)``: it contracts to ``v`` at rate ``s^2 / (v + s^2)``.
- references: the noisy copies and the clean set fitted directly.

Gaussian noise keeps a mixture's weights and means (the noisy law is ``sum_k pi_k N(mu_k, S_k + s^2 I)``), so
noisy-only is *not* expected to be off in weights and means; its error is in the covariances (``+ s^2`` on the
diagonal), where deconvolution must show. One command: ``python benchmarks/privacy/mixture.py --out DIR``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.config import TransportConfig  # noqa: E402
from pipeline.transport import build_transport  # noqa: E402
from pipeline.transport.gaussian_mixture import GaussianMixture  # noqa: E402
from privacy.sfbd import Schedule, denoise  # noqa: E402

METHODS = ["clean_only", "noisy_only", "sfbd", "sfbd_flow", "sfbd_exact", "noisy_copies", "clean_set"]


# ------------------------------------------------------------------ EM fit of a mixture (the read-out)

def fit_mixture(x: torch.Tensor, k: int, seed: int, iters: int = 200, inits: int = 3) -> GaussianMixture:
    """Maximum-likelihood ``k``-component full-covariance mixture by EM (k-means++ starts, best of ``inits``)."""
    x = x.to(torch.float64)
    n, d = x.shape
    best, best_ll = None, -math.inf
    for init in range(inits):
        g = torch.Generator().manual_seed(seed * 31 + init)
        means = x[torch.randint(n, (1,), generator=g)]
        for _ in range(k - 1):  # k-means++
            d2 = torch.cdist(x, means).min(1).values ** 2
            means = torch.cat([means, x[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
        covs = torch.stack([torch.cov(x.T) for _ in range(k)])
        w = torch.full((k,), 1.0 / k, dtype=torch.float64)
        eye = 1e-6 * torch.eye(d, dtype=torch.float64)
        ll = -math.inf
        for _ in range(iters):
            dist = torch.distributions.MultivariateNormal(means, covariance_matrix=covs + eye)
            logp = dist.log_prob(x[:, None, :]) + torch.log(w)[None]  # [n, k]
            ll_new = float(torch.logsumexp(logp, 1).mean())
            r = torch.softmax(logp, 1)
            nk = r.sum(0) + 1e-12
            w, means = nk / n, (r.T @ x) / nk[:, None]
            diff = x[:, None, :] - means[None]
            covs = torch.einsum("nk,nki,nkj->kij", r, diff, diff) / nk[:, None, None]
            if abs(ll_new - ll) < 1e-9:
                break
            ll = ll_new
        if ll > best_ll:
            best, best_ll = GaussianMixture(means, covs + eye, w), ll
    assert best is not None
    return best


def mixture_errors(fit: GaussianMixture, truth: GaussianMixture) -> dict[str, float]:
    """Max errors of the fit's weights, means (Euclidean) and covariances (entries) under the permutation of its
    components closest to the truth's means."""
    k = truth.means.shape[0]
    perm = min(itertools.permutations(range(k)),
               key=lambda p: float((fit.means[list(p)] - truth.means).norm(dim=1).sum()))
    p = list(perm)
    return {"weights_err": float((fit.weights[p] - truth.weights).abs().max()),
            "means_err": float((fit.means[p] - truth.means).norm(dim=1).max()),
            "covs_err": float((fit.covs[p] - truth.covs).abs().max())}


# ------------------------------------------------------------------ the learned model

class VelocityMLP(nn.Module):
    """``v(x, t)``: an MLP on ``x`` and Fourier features of ``t``."""

    def __init__(self, dim: int = 2, width: int = 128) -> None:
        super().__init__()
        self.freqs = nn.Parameter(torch.arange(1, 9, dtype=torch.float32) * math.pi, requires_grad=False)
        self.net = nn.Sequential(nn.Linear(dim + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        f = t * self.freqs.to(x.dtype)[None]
        return self.net(torch.cat([x, torch.sin(f), torch.cos(f)], 1))


class Trainer:
    """Flow matching on the Linear path (``x_t = t x1 + (1 - t) x0``, target ``x1 - x0``), Adam, one model."""

    def __init__(self, seed: int, lr: float = 2e-3, batch: int = 512) -> None:
        torch.manual_seed(seed)
        self.model = VelocityMLP().double()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.batch, self.gen = batch, torch.Generator().manual_seed(seed + 1)
        self.transport = build_transport(TransportConfig(path="linear"))
        self.sample_gradients = 0
        self.denoise_evals = 0

    def step(self, x1: torch.Tensor) -> float:
        x0 = torch.randn(x1.shape, generator=self.gen, dtype=x1.dtype)
        t = torch.rand(x1.shape[0], 1, generator=self.gen, dtype=x1.dtype)
        loss = ((self.model(t * x1 + (1 - t) * x0, t) - (x1 - x0)) ** 2).sum(1).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sample_gradients += x1.shape[0]
        return float(loss.detach())

    def draw(self, data: torch.Tensor) -> torch.Tensor:
        return data[torch.randint(data.shape[0], (self.batch,), generator=self.gen)]

    def denoise(self, y: torch.Tensor, s: float, steps: int) -> torch.Tensor:
        x, nfe = denoise(SimpleNamespace(transport=self.transport), self.model, y, s, steps=steps, solver="heun",
                         batch_size=8192)
        self.denoise_evals += y.shape[0] * nfe
        return x.detach()

    @torch.no_grad()
    def sample(self, n: int, seed: int, steps: int = 50) -> torch.Tensor:
        from pipeline.transport.ode import ODESampler

        x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return ODESampler(self.transport, solver="heun", steps=steps).sample(self.model, x0).x


def mixed_batch(trainer: Trainer, clean: torch.Tensor, pool: torch.Tensor, w: float) -> torch.Tensor:
    """A batch of clean ∪ pool, each element drawn from the pool with probability ``w n_d / (n_c + w n_d)``
    (the stage's mixed loss, as a sampling law)."""
    if pool is None or w == 0.0:
        return trainer.draw(clean)
    p = w * pool.shape[0] / (clean.shape[0] + w * pool.shape[0])
    from_pool = torch.rand(trainer.batch, generator=trainer.gen) < p
    return torch.where(from_pool[:, None], trainer.draw(pool), trainer.draw(clean))


# ------------------------------------------------------------------ methods

def run_method(method: str, clean: torch.Tensor, noisy: torch.Tensor, s: float, args: Any, seed: int,
               truth: GaussianMixture) -> dict[str, Any]:
    t0 = time.perf_counter()
    if method == "noisy_copies":
        return {"samples": noisy, "seconds": 0.0}
    if method == "clean_set":
        return {"samples": clean, "seconds": 0.0}
    if method == "sfbd_exact":
        return {"samples": sfbd_exact(clean, noisy, s, args.rounds_exact, seed), "seconds": time.perf_counter() - t0}
    tr = Trainer(seed)
    warm = args.warmup
    total = warm + args.steps  # every trained method takes the same steps of one batch (same sample-gradients)
    if method == "noisy_only":  # from scratch on the noisy copies alone
        for _ in range(total):
            tr.step(tr.draw(noisy))
    else:
        for _ in range(warm):
            tr.step(tr.draw(clean))
    if method == "noisy_only":
        pass
    elif method == "clean_only":
        for _ in range(args.steps):
            tr.step(tr.draw(clean))
    elif method == "sfbd":
        sched = Schedule("sfbd", total, warmup_steps=warm, rounds=args.rounds)
        pool = None
        for step in range(warm, total):
            if sched.refresh(step):
                pool = tr.denoise(noisy, s, args.denoise_steps)
            tr.step(mixed_batch(tr, clean, pool, 1.0))
    elif method == "sfbd_flow":
        n = noisy.shape[0]
        chunk = math.ceil(n / max(1, args.chunks))
        refresh_every = max(1, args.steps // (args.redenoise * args.chunks))
        sched = Schedule("sfbd_flow", total, warmup_steps=warm, refresh_every=refresh_every, ramp_start=warm,
                         ramp_end=warm + args.steps // 2)
        pool, cursor = noisy.clone(), 0
        for step in range(warm, total):
            kind = sched.refresh(step)
            if kind == "full":
                pool = tr.denoise(noisy, s, args.denoise_steps)
            elif kind == "chunk":
                idx = (cursor + torch.arange(chunk)) % n
                cursor = int((cursor + chunk) % n)
                pool[idx] = tr.denoise(noisy[idx], s, args.denoise_steps)
            tr.step(mixed_batch(tr, clean, pool, sched.weight(step)))
    else:
        raise ValueError(method)
    return {"samples": tr.sample(args.eval_samples, seed + 7), "seconds": time.perf_counter() - t0,
            "sample_gradients": tr.sample_gradients, "denoise_sample_nfe": tr.denoise_evals}


def sfbd_exact(clean: torch.Tensor, noisy: torch.Tensor, s: float, rounds: int, seed: int) -> torch.Tensor:
    """SFBD with a mixture model: fit on the clean set, then ``rounds`` x (denoise all noisy copies with the
    model's exact velocity from t*; refit on clean ∪ denoised). Returns the last round's clean ∪ denoised set."""
    transport = build_transport(TransportConfig(path="linear"))
    model = fit_mixture(clean, 3, seed)
    data = clean
    for _ in range(rounds):
        x_hat, _ = denoise(SimpleNamespace(transport=transport), model.model_fn(transport.path, "velocity"), noisy,
                           s, steps=20, solver="heun", batch_size=8192)
        data = torch.cat([clean, x_hat])
        model = fit_mixture(data, 3, seed)
    return data


def make_data(truth: GaussianMixture, n: int, clean_fraction: float, s: float,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of the truth: the first ``clean_fraction`` kept clean, the rest released with noise ``s``."""
    g = torch.Generator().manual_seed(seed)
    x = truth.sample(n, generator=g)
    n_clean = round(clean_fraction * n)
    noisy = x[n_clean:] + s * torch.randn(x[n_clean:].shape, generator=g, dtype=torch.float64)
    return x[:n_clean], noisy


def check_args(args: Any) -> None:
    """Bad settings: one line (exit 2 at the CLI)."""
    if not 0 < args.clean_fraction < 1:
        raise ValueError(f"--clean-fraction={args.clean_fraction}: SFBD needs some clean samples and some noisy "
                         f"copies (0 < fraction < 1)")
    if args.s <= 0:
        raise ValueError(f"--s={args.s} must be positive")
    if args.redenoise * args.chunks > args.steps:
        raise ValueError(f"--redenoise={args.redenoise} x --chunks={args.chunks} refreshes do not fit in "
                         f"--steps={args.steps}")


def run(args: Any) -> dict[str, Any]:
    truth = GaussianMixture.default_2d()
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in args.methods}
    for seed in range(args.seeds):
        clean, noisy = make_data(truth, args.n, args.clean_fraction, args.s, seed)
        for method in args.methods:
            out = run_method(method, clean, noisy, args.s, args, seed, truth)
            x = out.pop("samples")
            row = {**mixture_errors(fit_mixture(x, 3, seed), truth), "mmd2": truth.mmd2(x[:4000]), **out}
            rows[method].append(row)
            print(f"[mixture] seed {seed} {method:12s} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()),
                  flush=True)
    summary = {m: {k: (float(torch.tensor([float(r[k]) for r in rs]).mean()),
                       float(torch.tensor([float(r[k]) for r in rs]).std()) if len(rs) > 1 else 0.0)
                   for k in rs[0]} for m, rs in rows.items()}
    return {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "truth": {
        "weights": truth.weights.tolist(), "means": truth.means.tolist(), "covs": truth.covs.tolist()},
        "rows": rows, "summary": summary}


def table(result: dict[str, Any]) -> str:
    st = result["settings"]
    lines = [f"n = {st['n']}, clean fraction {st['clean_fraction']:.0%}, s = {st['s']}, {st['seeds']} seeds "
             f"(mean ± sd); errors are maxima over the 3 components (means: Euclidean; covariances: entries)", "",
             "| method | weights err | means err | covs err | MMD² | sample-gradients | denoise evals | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for m, cols in result["summary"].items():
        def cell(k: str, fmt: str = ".3f") -> str:
            if k not in cols:
                return "–"
            mean, sd = cols[k]
            return f"{mean:{fmt}} ± {sd:{fmt}}" if sd else f"{mean:{fmt}}"
        lines.append(f"| {m} | {cell('weights_err')} | {cell('means_err')} | {cell('covs_err')} | "
                     f"{cell('mmd2', '.4f')} | {cell('sample_gradients', '.3g')} | "
                     f"{cell('denoise_sample_nfe', '.3g')} | {cell('seconds', '.1f')} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_privacy_mixture")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--clean-fraction", type=float, default=0.05)
    p.add_argument("--s", type=float, default=0.59)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1500)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--rounds-exact", type=int, default=12)
    p.add_argument("--chunks", type=int, default=10, help="SFBD flow: the pool is refreshed in this many chunks")
    p.add_argument("--redenoise", type=int, default=10, help="SFBD flow: times each copy is re-denoised")
    p.add_argument("--denoise-steps", type=int, default=20)
    p.add_argument("--eval-samples", type=int, default=8000)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as exc:
        print(f"mixture: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = run(args)
    result["wall_seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixture.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"[mixture] {result['wall_seconds']:.0f} s; wrote {args.out / 'mixture.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
