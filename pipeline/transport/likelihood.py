"""Negative log-likelihood through the probability-flow ODE (instantaneous change of variables).

Along ``dx/dt = v(x, t)``: ``d/dt log p_t(x_t) = -div v(x_t, t)``. Integrating the augmented state
``(x, l)``, ``dl/dt = div v``, backwards from data (t1, l = 0) to noise (t0) gives
``log p_t1(x1) = log p_t0(x_t0) + l(t0)``, with the prior ``p_t0 = N(0, sigma(t0)^2 I)`` (exact where
alpha(t0) = 0). The divergence is Hutchinson's ``E[e^T (dv/dx) e]`` with one Rademacher probe per sample held
fixed along the solve (the default: one backward pass per evaluation), or exact (one backward pass per dimension)
for small data (by default when a sample has at most ``EXACT_MAX_DIM`` dimensions).

:func:`reconstruction_error`: the reverse ODE maps data to noise (t1 -> t0) and the forward ODE back; the mean
squared difference to the input measures the sampler's (and the field's) invertibility.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchdiffeq import odeint

from pipeline.transport.core import ModelFn, Transport
from pipeline.transport.ode import CountedField, integrate

EXACT_MAX_DIM = 16  # exact divergence up to this many dimensions per sample (auto mode)


@dataclass
class NLLOutput:
    nats_per_dim: torch.Tensor  # [B]
    bits_per_dim: torch.Tensor  # [B]; with pixel_levels, of the dequantized discrete data
    nfe: int


def _divergence(v: torch.Tensor, x: torch.Tensor, probe: torch.Tensor | None) -> torch.Tensor:
    if probe is not None:
        (g,) = torch.autograd.grad((v * probe).sum(), x, create_graph=False)
        return (g * probe).flatten(1).sum(1)
    flat_v = v.flatten(1)
    div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(flat_v.shape[1]):
        (g,) = torch.autograd.grad(flat_v[:, i].sum(), x, retain_graph=i + 1 < flat_v.shape[1])
        div = div + g.flatten(1)[:, i]
    return div


def nll(transport: Transport, model_fn: ModelFn, x1: torch.Tensor, exact_divergence: bool | None = None, *,
        method: str = "dopri5", atol: float = 1e-5, rtol: float = 1e-5, steps: int = 64,
        generator: torch.Generator | None = None, pixel_levels: int | None = None, **model_kwargs) -> NLLOutput:
    """Per-sample NLL of ``x1`` under the model's probability-flow ODE, in nats/dim and bits/dim.

    ``pixel_levels`` (e.g. 256 for 8-bit pixels scaled to [-1, 1]) adds ``log2(levels / 2)`` to bits/dim: the NLL
    of uniformly dequantized discrete data. ``steps`` sets the grid of fixed-step methods only.
    ``exact_divergence``: None = exact up to ``EXACT_MAX_DIM`` dimensions per sample, Hutchinson above.
    """
    if exact_divergence is None:
        exact_divergence = x1[0].numel() <= EXACT_MAX_DIM
    t0, t1 = transport.sample_interval(sde=False)
    probe = None
    if not exact_divergence:
        dev = generator.device if generator is not None else x1.device
        probe = (torch.randint(0, 2, x1.shape, generator=generator, device=dev).to(x1.device, x1.dtype) * 2 - 1)
    nfe = 0

    def f(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        nonlocal nfe
        nfe += 1
        x = state[0]
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = transport.velocity(model_fn, x, t, **model_kwargs)
            div = _divergence(v, x, probe)
        return v.detach(), div.detach()

    span = torch.tensor([t1, t0], dtype=x1.dtype, device=x1.device)
    l0 = torch.zeros(x1.shape[0], dtype=x1.dtype, device=x1.device)
    method = {"heun": "heun2"}.get(method, method)  # flowrail's solver names -> torchdiffeq's
    options = None if method in ("dopri5", "dopri8", "bosh3", "adaptive_heun") else {"step_size": (t1 - t0) / steps}
    xs, ls = odeint(f, (x1, l0), span, method=method, atol=atol, rtol=rtol, options=options)
    x_t0, l_t0 = xs[-1], ls[-1]
    dim = x1[0].numel()
    s0 = float(transport.path.sigma(torch.tensor(t0, dtype=torch.float64)))
    log_prior = -0.5 * (x_t0.flatten(1).pow(2).sum(1) / s0**2 + dim * math.log(2 * math.pi * s0**2))
    logp = log_prior + l_t0
    nats = -logp / dim
    bits = nats / math.log(2) + (math.log2(pixel_levels / 2) if pixel_levels else 0.0)
    return NLLOutput(nats_per_dim=nats, bits_per_dim=bits, nfe=nfe)


@dataclass
class ReconstructionOutput:
    mse: torch.Tensor  # [B], mean over dimensions of (x1 - decode(encode(x1)))^2
    noise: torch.Tensor  # [B, ...], the encoded state at t0
    nfe: int  # evaluations of both solves


@torch.no_grad()
def reconstruction_error(transport: Transport, model_fn: ModelFn, x1: torch.Tensor, *, solver: str = "dopri5",
                         steps: int = 64, atol: float = 1e-5, rtol: float = 1e-5, **model_kwargs
                         ) -> ReconstructionOutput:
    """Data -> noise by the reverse probability-flow ODE (t1 -> t0), then noise -> data (t0 -> t1)."""
    t0, t1 = transport.sample_interval(sde=False)
    f = CountedField(lambda t, x: transport.velocity(model_fn, x, t, **model_kwargs))
    noise = integrate(f, x1, solver, t1, t0, steps, atol=atol, rtol=rtol)
    back = integrate(f, noise, solver, t0, t1, steps, atol=atol, rtol=rtol)
    return ReconstructionOutput(mse=(back - x1).pow(2).flatten(1).mean(1), noise=noise, nfe=f.nfe)
