"""Rectified-flow fine-tuning objective and Euler sampler for FLUX (REFERENCE.md sections 1, 4, 9).

Project convention inside: ``x_t = t x1 + (1 - t) x0`` (t = 0 noise, t = 1 data), velocity ``u = x1 - x0``.
FLUX's convention appears only in :func:`flux_velocity`, the model boundary: noise level ``sigma = 1 - t`` is passed
as ``timestep`` (diffusers' ``FluxTransformer2DModel`` multiplies ``timestep`` and ``guidance`` by 1000 itself), and
the network predicts ``d x / d sigma = x0 - x1 = -u`` on packed 2x2 tokens.

Training loss: ``E_t w(sigma) || v_theta(x_t, t) - (x1 - x0) ||^2`` with t from ``cfg.transport`` (uniform,
logit-normal or mode; optional FLUX resolution shift) and ``w`` one of
``none`` (1), ``sigma_sqrt`` (``sigma^-2``) or ``cosmap`` (``2 / (pi (1 - 2 sigma + 2 sigma^2))``), as in SD3.
Batches: ``latent`` (or ``image``; B, 16, H, W, already ``(z - shift) * scale``), ``t5`` (B, L, D_t5),
``clip_pooled`` (B, D_clip).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import TrainJobConfig, TransportConfig
from pipeline.flux.packing import (
    image_ids,
    num_image_tokens,
    pack_latents,
    text_ids,
    unpack_latents,
)
from pipeline.objective import SampleOutput
from pipeline.transport.timesteps import flux_mu, sample_train_times, time_grid

SIGMA_FLOOR = 1e-3  # keeps sigma^-2 finite in the sigma_sqrt weighting


def unwrap(model: nn.Module) -> nn.Module:
    """The FluxTransformer2DModel inside a DeepSpeed engine / DDP wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def flux_velocity(model: nn.Module, x: torch.Tensor, t: torch.Tensor, t5: torch.Tensor, clip_pooled: torch.Tensor,
                  guidance: float | None) -> torch.Tensor:
    """Project-convention velocity ``d x_t / d t`` (B, C, H, W) of a FLUX transformer at latents ``x`` and times ``t``.

    ``guidance`` is used only if the model has a guidance embedding (guidance-distilled "dev" models).
    """
    inner = unwrap(model)
    dtype = next(inner.parameters()).dtype
    b, _, h, w = x.shape
    sigma = (1.0 - t).to(dtype)
    guidance_in = None
    if inner.config.guidance_embeds:
        guidance_in = torch.full((b,), 1.0 if guidance is None else float(guidance), device=x.device, dtype=dtype)
    out = model(hidden_states=pack_latents(x).to(dtype), encoder_hidden_states=t5.to(dtype),
                pooled_projections=clip_pooled.to(dtype), timestep=sigma, guidance=guidance_in,
                img_ids=image_ids(h, w, device=x.device), txt_ids=text_ids(t5.shape[1], device=x.device),
                return_dict=False)[0]
    return -unpack_latents(out.float(), h, w)


def loss_weight(sigma: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weight as a function of the FLUX noise level ``sigma = 1 - t``."""
    if scheme == "none":
        return torch.ones_like(sigma)
    if scheme == "sigma_sqrt":
        return sigma.clamp_min(SIGMA_FLOOR) ** -2
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"flux.loss_weighting={scheme!r} is unknown (allowed: none, sigma_sqrt, cosmap)")


def flux_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(latent fp32, t5, clip_pooled)`` of a FLUX batch; a missing key is named."""
    latent = batch.get("latent", batch.get("image"))  # the streaming loader names any stored array "image"
    for key, value in (("latent", latent), ("t5", batch.get("t5")), ("clip_pooled", batch.get("clip_pooled"))):
        if value is None:
            raise ValueError(f"FLUX batches need '{key}' (have: {', '.join(sorted(batch))}); "
                             "pre-encode the shards with `flowrail flux_encode`")
    return latent.float(), batch["t5"], batch["clip_pooled"]


def require_text(cond: dict[str, torch.Tensor]) -> None:
    """FLUX samples condition on text embeddings; name what is missing."""
    if "t5" not in cond or "clip_pooled" not in cond:
        raise ValueError(f"FLUX sampling needs 't5' and 'clip_pooled' conditioning (got {', '.join(sorted(cond))}); "
                         "evaluation takes them from the shard set (pipeline.flux.evaluation.flux_eval_view)")


def batched(cond: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if cond.shape[0] == n:
        return cond
    if cond.shape[0] == 1:
        return cond.expand(n, *cond.shape[1:])
    raise ValueError(f"conditioning '{name}' has batch {cond.shape[0]}, expected 1 or {n}")


@dataclass
class FluxObjective:
    """Rectified flow on FLUX latents; implements :class:`pipeline.objective.Objective`."""

    transport: TransportConfig
    guidance: float = 1.0
    loss_weighting: str = "none"
    sample_steps: int = 28
    sample_shift: float = 1.0  # 1: FLUX resolution shift exp(mu(tokens)); otherwise this constant shift
    train_eps: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainJobConfig) -> FluxObjective | FluxDFMObjective:  # noqa: F821
        """The FLUX objective of ``cfg``; with ``flux.dfm=true`` the two-stage DFM one
        (:class:`pipeline.flux.dfm.FluxDFMObjective`)."""
        if cfg.flux.dfm:
            from pipeline.flux.dfm import FluxDFMObjective

            return FluxDFMObjective.from_config(cfg)
        loss_weight(torch.zeros(1), cfg.flux.loss_weighting)  # validate early
        return cls(transport=cfg.transport, guidance=cfg.flux.guidance, loss_weighting=cfg.flux.loss_weighting,
                   sample_steps=cfg.sampler.steps, sample_shift=cfg.sampler.time_shift,
                   train_eps=cfg.transport.train_eps or 0.0)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x1, t5, pooled = flux_batch(batch)
        b, _, h, w = x1.shape
        x0 = torch.randn_like(x1)
        t = sample_train_times(self.transport, b, self.train_eps, num_tokens=num_image_tokens(h, w), device=x1.device)
        tb = t.view(b, 1, 1, 1)
        xt = tb * x1 + (1 - tb) * x0
        v = flux_velocity(model, xt, t, t5, pooled, self.guidance)
        per_sample = ((v - (x1 - x0)) ** 2).mean(dim=(1, 2, 3))
        return (loss_weight(1 - t, self.loss_weighting) * per_sample).mean()

    def schedule(self, height: int, width: int, device=None) -> torch.Tensor:
        """``steps + 1`` times from 0 (noise) to 1 (data) on the FLUX shifted grid."""
        shift = math.exp(flux_mu(num_image_tokens(height, width))) if self.sample_shift == 1.0 else self.sample_shift
        return time_grid(0.0, 1.0, self.sample_steps, shift=shift, device=device)

    @torch.no_grad()
    def sample(self, model: nn.Module, cond: dict[str, torch.Tensor], shape: tuple[int, ...],
               generator: torch.Generator | None = None) -> SampleOutput:
        """Euler from t = 0 to 1 on :meth:`schedule`; ``cond`` holds ``t5`` and ``clip_pooled``; returns latents."""
        require_text(cond)
        b, _, h, w = shape
        device = cond["t5"].device
        x = torch.randn(shape, generator=generator, device=generator.device if generator else device).to(device)
        t5, pooled = batched(cond["t5"], b, "t5"), batched(cond["clip_pooled"], b, "clip_pooled")
        grid = self.schedule(h, w, device=device)
        for t, t_next in itertools.pairwise(grid):
            v = flux_velocity(model, x, t.float().expand(b), t5, pooled, self.guidance)
            x = x + float(t_next - t) * v
        return SampleOutput(x=x, nfe=self.sample_steps)
