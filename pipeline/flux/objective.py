"""Rectified-flow fine-tuning objective and ODE sampler for FLUX (REFERENCE.md sections 1, 4, 9).

Project convention inside: ``x_t = t x1 + (1 - t) x0`` (t = 0 noise, t = 1 data), velocity ``u = x1 - x0``.
FLUX's convention appears only in :func:`flux_velocity`, the model boundary: noise level ``sigma = 1 - t`` is passed
as ``timestep`` (diffusers' ``FluxTransformer2DModel`` multiplies ``timestep`` and ``guidance`` by 1000 itself), and
the network predicts ``d x / d sigma = x0 - x1 = -u`` on packed 2x2 tokens.

Training loss: ``E_t w(sigma) || v_theta(x_t, t) - (x1 - x0) ||^2`` with t from ``cfg.transport`` (uniform,
logit-normal or mode; optional FLUX resolution shift) and ``w`` one of
``none`` (1), ``sigma_sqrt`` (``sigma^-2``) or ``cosmap`` (``2 / (pi (1 - 2 sigma + 2 sigma^2))``), as in SD3.
Batches: ``latent`` (or ``image``; B, 16, H, W, already ``(z - shift) * scale``), ``t5`` (B, L, D_t5),
``clip_pooled`` (B, D_clip).

Sampling: ``dx/dt = v`` from t = 0 to 1 with any :mod:`pipeline.transport.ode` solver (euler, heun, midpoint, rk4,
pseudo_corrector on the grid shifted by ``sampler.time_shift``: ``auto`` = FLUX's resolution shift
``exp(mu(tokens))``, a number = that shift, 1 = none; or adaptive dopri5). Guidance: ``flux.guidance`` feeds the
guidance embedding of distilled ("dev") models; ``guidance.scale = w != 1`` is true classifier-free guidance
``v = v_u + w (v_c - v_u)`` against the empty prompt's embeddings (``cond["t5_uncond"]``,
``cond["clip_pooled_uncond"]``), inside ``[guidance.t_min, guidance.t_max]``.
"""
from __future__ import annotations

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
from pipeline.families import SampleOutput
from pipeline.transport.ode import CountedField, integrate
from pipeline.transport.timesteps import resolve_time_shift, sample_train_times, time_grid

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
    guidance: float = 1.0  # the guidance-embedding value (guidance-distilled models)
    loss_weighting: str = "none"
    sample_steps: int = 28
    sample_shift: float | str | None = "auto"  # sampler.time_shift; None: auto (FLUX's resolution shift)
    train_eps: float = 0.0
    solver: str = "euler"
    atol: float = 1e-6
    rtol: float = 1e-3
    cfg_scale: float = 1.0  # true CFG against the empty prompt (guidance.scale)
    cfg_t_min: float = 0.0
    cfg_t_max: float = 1.0

    @classmethod
    def from_config(cls, cfg: TrainJobConfig) -> FluxObjective:
        """The plain FLUX objective of ``cfg`` (settings are checked by the FLUX family, pipeline.flux.family)."""
        loss_weight(torch.zeros(1), cfg.flux.loss_weighting)  # validate early
        s, g = cfg.sampler, cfg.guidance
        return cls(transport=cfg.transport, guidance=cfg.flux.guidance, loss_weighting=cfg.flux.loss_weighting,
                   sample_steps=s.steps, sample_shift=s.time_shift, train_eps=cfg.transport.train_eps or 0.0,
                   solver=s.solver, atol=s.atol, rtol=s.rtol, cfg_scale=g.scale, cfg_t_min=g.t_min,
                   cfg_t_max=g.t_max)

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

    def shift(self, height: int, width: int) -> float:
        """The numeric grid shift for (height, width) latents (``auto``: exp(mu(packed image tokens)))."""
        return resolve_time_shift(self.sample_shift, num_image_tokens(height, width), default="auto")

    def schedule(self, height: int, width: int, device=None) -> torch.Tensor:
        """``steps + 1`` times from 0 (noise) to 1 (data) on the shifted grid."""
        return time_grid(0.0, 1.0, self.sample_steps, shift=self.shift(height, width), device=device)

    def _field(self, model: nn.Module, cond: dict[str, torch.Tensor], b: int):
        """``f(t, x)``: the (optionally classifier-free guided) project-convention velocity."""
        t5, pooled = batched(cond["t5"], b, "t5"), batched(cond["clip_pooled"], b, "clip_pooled")
        if self.cfg_scale == 1.0:
            return lambda t, x: flux_velocity(model, x, t.float().expand(b), t5, pooled, self.guidance)
        if "t5_uncond" not in cond or "clip_pooled_uncond" not in cond:
            raise ValueError(f"guidance.scale={self.cfg_scale} on FLUX is true CFG against the empty prompt: its "
                             "embeddings (cond t5_uncond, clip_pooled_uncond) are needed; pre-encode a sample with "
                             "an empty caption in the evaluation shards, or set guidance.scale=1")
        t5_u = batched(cond["t5_uncond"], b, "t5_uncond")
        pooled_u = batched(cond["clip_pooled_uncond"], b, "clip_pooled_uncond")

        def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            tb = t.float().expand(b)
            v_c = flux_velocity(model, x, tb, t5, pooled, self.guidance)
            inside = ((tb >= self.cfg_t_min) & (tb <= self.cfg_t_max)).view(b, 1, 1, 1)
            if not bool(inside.any()):
                return v_c
            v_u = flux_velocity(model, x, tb, t5_u, pooled_u, self.guidance)
            return torch.where(inside, v_u + self.cfg_scale * (v_c - v_u), v_c)

        return f

    @torch.no_grad()
    def sample(self, model: nn.Module, cond: dict[str, torch.Tensor], shape: tuple[int, ...],
               generator: torch.Generator | None = None) -> SampleOutput:
        """``sampler.solver`` from t = 0 to 1 on :meth:`schedule`; ``cond`` holds ``t5`` and ``clip_pooled``
        (and the empty prompt's ``t5_uncond``/``clip_pooled_uncond`` for CFG); returns latents."""
        require_text(cond)
        b, _, h, w = shape
        device = cond["t5"].device
        x = torch.randn(shape, generator=generator, device=generator.device if generator else device).to(device)
        f = CountedField(self._field(model, cond, b))
        x = integrate(f, x, self.solver, 0.0, 1.0, self.sample_steps, self.shift(h, w), self.atol, self.rtol)
        return SampleOutput(x=x, nfe=f.nfe)
