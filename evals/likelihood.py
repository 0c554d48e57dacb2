"""Likelihood metrics of a trained transport model, on real data (the validation shards, else the training ones):

- ``bpd``: negative log-likelihood in bits per dimension through the probability-flow ODE
  (:func:`pipeline.transport.likelihood.nll`; Hutchinson's divergence estimator, exact for small data). Pixel data
  are discrete: ``x = k / 127.5 - 1``, ``k`` in 0..255, a grid of spacing ``Delta = 2 / 255``; they are uniformly
  dequantized (:func:`dequantized_bits_per_dim`) and the bound on the discrete NLL is reported; latents are
  continuous (plain NLL).
- ``reconstruction_mse``: mean squared error of data -> noise (reverse ODE) -> data.

Both integrate with the ODE solver of the sampler settings (``sampler.solver``/``steps``, dopri5 with
``sampler.atol``/``rtol``; dopri5 when the sampler is an SDE; heun for the pseudo-corrector in the NLL).

Both condition a class-conditional model on the data's labels (no guidance) and use the first
``eval.bpd_samples`` samples. They apply to the SiT family (the transport's ODE); other families are refused.
"""
from __future__ import annotations

from typing import Any

import torch

LIKELIHOOD_METRICS = ("bpd", "reconstruction_mse")


def dequantized_bits_per_dim(transport: Any, model: Any, x: torch.Tensor, levels: int,
                             generator: torch.Generator | None = None, **nll_kw: Any) -> torch.Tensor:
    """Per-sample bits/dim of discrete data ``x`` on the ``levels``-point grid of [-1, 1] (spacing
    ``Delta = 2 / (levels - 1)``), an upper bound on its discrete NLL.

    Uniform dequantization: ``y = x + Delta (u - 1/2)``, ``u ~ U[0, 1)^D``, so the cells ``x + Delta [-1/2, 1/2)^D``
    partition space and ``P(x) = Delta^D E_u[p(y)] >= Delta^D exp(E_u[log p(y)])`` (Jensen). Hence, in bits/dim,
    ``-log2 P(x) / D <= E_u[-log2 p(y)] / D - log2 Delta``: the model's continuous density is evaluated at the
    dequantized point (one draw of ``u`` per sample, an unbiased estimate of the expectation) and the discrete-data
    correction ``-log2 Delta`` (= log2(127.5) for 8-bit pixels) is added. Without the noise, ``-log2 p(x)`` at grid
    points can be made arbitrarily small by a density that spikes on the grid: not a bound.
    """
    import math

    from pipeline.transport.likelihood import nll

    delta = 2.0 / (levels - 1)
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    y = x + delta * (u - 0.5)
    out = nll(transport, model, y, generator=generator, **nll_kw)
    return out.bits_per_dim - math.log2(delta)


def check_applicable(trained: Any, requested: list[str]) -> None:
    """Refuse, in one line, likelihood metrics for a model without a transport ODE."""
    wanted = [m for m in requested if m in LIKELIHOOD_METRICS]
    if wanted and not hasattr(trained.objective, "transport"):
        raise ValueError(f"eval.metrics={wanted[0]} is not available for model family {trained.config.model.name}: "
                         "it integrates the transport's probability-flow ODE (sit / SiT-* models)")


def real_data(cfg: Any) -> dict[str, Any]:
    """The real images the likelihood metrics read: ``eval.bpd_samples`` of ``data.val_shards`` (else
    ``data.shards``) in batches of ``eval.batch_size``."""
    return {"shards": cfg.data.val_shards or cfg.data.shards, "batch_size": cfg.eval.batch_size,
            "max_samples": cfg.eval.bpd_samples}


def likelihood_metrics(trained: Any, cfg: Any, requested: list[str]) -> dict[str, float]:
    from evals.reference import iter_real_batches
    from pipeline.transport.likelihood import nll, reconstruction_error

    wanted = [m for m in requested if m in LIKELIHOOD_METRICS]
    if not wanted:
        return {}
    check_applicable(trained, wanted)
    transport, model = trained.objective.transport, trained.model
    device = next(model.parameters()).device
    levels = 256 if getattr(trained.data, "kind", "pixels") == "pixels" else None
    generator = torch.Generator().manual_seed(cfg.eval.seed)
    s = cfg.sampler  # the ODE solver of the sampler settings (dopri5 when sampling is an SDE)
    solver = s.solver if s.method == "ode" else "dopri5"
    nll_solver = solver if solver in ("euler", "heun", "midpoint", "rk4", "dopri5") else "heun"
    bits, mse, count = [], [], 0
    for images, labels in iter_real_batches(**real_data(cfg), image_size=trained.data.size):
        x1 = images.to(device=device, dtype=torch.float32)
        kw = {"y": labels.to(device)} if trained.num_classes else {}
        if "bpd" in wanted:
            ode = {"method": nll_solver, "steps": s.steps, "atol": s.atol, "rtol": s.rtol, **kw}
            bits.append(dequantized_bits_per_dim(transport, model, x1, levels, generator, **ode) if levels
                        else nll(transport, model, x1, generator=generator, **ode).bits_per_dim)
        if "reconstruction_mse" in wanted:
            out = reconstruction_error(transport, model, x1, solver=solver, steps=s.steps, atol=s.atol,
                                       rtol=s.rtol, **kw)
            mse.append(out.mse)
        count += len(x1)
    metrics: dict[str, float] = {"likelihood_samples": float(count)}
    if bits:
        metrics["bpd"] = float(torch.cat(bits).mean())
    if mse:
        metrics["reconstruction_mse"] = float(torch.cat(mse).mean())
    return metrics
