"""A Gaussian-mixture data law whose transport fields are known in closed form (for tests and benchmarks).

Data ``x1 ~ sum_k pi_k N(mu_k, S_k)``. On a path, ``x_t = alpha x1 + sigma x0`` has the mixture law
``sum_k pi_k N(alpha mu_k, C_k)``, ``C_k = alpha^2 S_k + sigma^2 I``. With responsibilities ``r_k(x)``:

- score     ``sum_k r_k (-C_k^{-1} (x - alpha mu_k))``
- E[x1|x]   ``sum_k r_k (mu_k + alpha S_k C_k^{-1} (x - alpha mu_k))``
- E[x0|x]   ``sum_k r_k sigma C_k^{-1} (x - alpha mu_k)``
- velocity  ``alpha' E[x1|x] + sigma' E[x0|x]`` (finite at t = 0; needs sigma' finite).
"""
from __future__ import annotations

import math

import torch

from pipeline.transport.paths import Path
from pipeline.transport.predictions import expand_t


class GaussianMixture:
    def __init__(self, means: torch.Tensor, covs: torch.Tensor, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # [K, D]
        self.covs = torch.as_tensor(covs, dtype=torch.float64)  # [K, D, D]
        k = self.means.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self._eigval, self._eigvec = torch.linalg.eigh(self.covs)  # S_k = U_k diag(lambda_k) U_k^T

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def default_2d(cls) -> GaussianMixture:
        """Three well-separated, anisotropic 2-D components with unequal weights."""
        means = torch.tensor([[-1.5, 0.5], [1.5, 1.0], [0.0, -1.5]])
        covs = torch.stack([torch.tensor([[0.20, 0.08], [0.08, 0.15]]), torch.tensor([[0.10, -0.05], [-0.05, 0.25]]),
                            torch.tensor([[0.30, 0.0], [0.0, 0.08]])])
        return cls(means, covs, torch.tensor([0.5, 0.3, 0.2]))

    # ------------------------------------------------------------------ law of the data

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + torch.einsum("ki,kj->kij", self.means, self.means))
        return second - torch.outer(m, m)

    def mmd2(self, x: torch.Tensor, bandwidth: float = 0.5) -> float:
        """Squared MMD between samples ``x`` and this law, Gaussian kernel ``exp(-|x - y|^2 / (2 h^2))``.

        The law's terms are exact (Gaussian integrals): ``E_y k(x, y)`` for ``y ~ N(m, S)`` is
        ``h^D det(S + h^2 I)^{-1/2} exp(-(x - m)^T (S + h^2 I)^{-1} (x - m) / 2)``; the x-x term is unbiased.
        """
        x = x.to(torch.float64)
        h2, d, n = bandwidth**2, self.dim, x.shape[0]
        eye = torch.eye(d, dtype=torch.float64)

        def expected_k(diff: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
            c = cov + h2 * eye
            sol = torch.linalg.solve(c, diff.unsqueeze(-1)).squeeze(-1)
            return bandwidth**d / torch.sqrt(torch.linalg.det(c)) * torch.exp(-0.5 * (diff * sol).sum(-1))

        kxx = torch.exp(-torch.cdist(x, x) ** 2 / (2 * h2))
        xx = (kxx.sum() - n) / (n * (n - 1))
        xy = (expected_k(x[:, None, :] - self.means[None], self.covs[None]) @ self.weights).mean()
        dm = self.means[:, None, :] - self.means[None, :, :]  # y - y' ~ N(mu_k - mu_l, S_k + S_l)
        yy = self.weights @ expected_k(dm, self.covs[:, None] + self.covs[None]) @ self.weights
        return float(xx - 2 * xy + yy)

    # ------------------------------------------------------------------ marginals of x_t

    def _components(self, path: Path, x: torch.Tensor, t: torch.Tensor):
        """Per-component (alpha, sigma, alpha', sigma', C^{-1}(x - alpha mu), log pi_k N_k(x)).

        ``C_k = U_k diag(alpha^2 lambda_k + sigma^2) U_k^T`` shares S_k's eigenvectors: no per-call factorisation.
        """
        x = x.to(torch.float64)
        tt = expand_t(t, x).reshape(-1)  # [B]
        a, s = path.alpha(tt), path.sigma(tt)
        da, ds = path.d_alpha(tt), path.d_sigma(tt)
        lam = a[:, None, None] ** 2 * self._eigval[None] + s[:, None, None] ** 2  # eigenvalues of C_k: [B, K, D]
        diff = x[:, None, :] - a[:, None, None] * self.means[None]  # [B, K, D]
        rot = torch.einsum("kji,bkj->bki", self._eigvec, diff)  # U_k^T diff
        sol = torch.einsum("kij,bkj->bki", self._eigvec, rot / lam)  # C_k^{-1} diff
        logdet = torch.log(lam).sum(-1)
        logp = -0.5 * ((diff * sol).sum(-1) + logdet + self.dim * math.log(2 * math.pi))  # [B, K]
        logw = torch.log(self.weights)[None] + logp
        return a, s, da, ds, sol, logw

    def log_prob(self, x: torch.Tensor, path: Path | None = None, t: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``log p_t(x)`` (the data law when ``path`` is None or t = 1)."""
        if path is None:
            from pipeline.transport.paths import LinearPath

            path, t = LinearPath(), 1.0
        *_, logw = self._components(path, x, torch.as_tensor(t, dtype=torch.float64))
        return torch.logsumexp(logw, dim=1)

    def score(self, path: Path, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        *_, sol, logw = self._components(path, x, t)
        r = torch.softmax(logw, dim=1)
        return -(r[..., None] * sol).sum(1).to(x.dtype)

    def expectations(self, path: Path, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x1 | x_t = x], E[x0 | x_t = x])."""
        a, s, _, _, sol, logw = self._components(path, x, t)
        r = torch.softmax(logw, dim=1)[..., None]
        x1 = (r * (self.means[None] + a[:, None, None] * torch.einsum("kij,bkj->bki", self.covs, sol))).sum(1)
        x0 = (r * s[:, None, None] * sol).sum(1)
        return x1, x0

    def velocity(self, path: Path, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x1, x0 = self.expectations(path, x, t)
        tt = expand_t(t, x1).reshape(-1, 1)
        return (path.d_alpha(tt) * x1 + path.d_sigma(tt) * x0).to(x.dtype)

    def noise(self, path: Path, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.expectations(path, x, t)[1].to(x.dtype)

    def model_fn(self, path: Path, prediction: str):
        """An exact "model" ``f(x, t, **kw)`` predicting ``prediction`` for this law on ``path``."""
        field = {"velocity": self.velocity, "score": self.score, "noise": self.noise}[prediction]
        return lambda x, t, **kw: field(path, x, t)
