"""Decomposable Flow Matching on FLUX (REFERENCE.md section 6): a two-stage DFM fine-tune of a FLUX transformer.

Stages of a latent ``x`` (B, 16, H, W), coarse first (:func:`pipeline.transport.multiscale.decompose`): stage 0 is
the (H/2, W/2) downsampled latent, stage 1 the (H, W) Laplacian residual. Both give the same ``(H/2)(W/2)`` tokens:
stage 1 packed 2x2 as FLUX packs latents (64 features), stage 0 one latent pixel per token (16 features); token
``(i, j)`` of either stage covers the same image region, so FLUX's image position ids are unchanged.

The pretrained layers are reused: the transformer blocks are shared by both stages, and FLUX's patch embedding,
time/guidance/text embedder and final layer (``norm_out`` + ``proj_out``) are the finest stage's, the token layout
they were trained on (as :func:`pipeline.models.dfm.dfm_from_sit` does for SiT). The coarse stage gets its own patch
embedding ``E_0``, timestep embedder ``T_0`` and final layer (adaLN norm + projection), all zero-initialised, so the
converted model starts as the pretrained FLUX acting on the finest stage::

    tokens = x_embedder(pack2(x_1)) + E_0(pack1(x_0))
    temb   = time_text_embed(sigma_1, guidance, pooled) + T_0(sigma_0)
    out_s  = proj_s(norm_s(blocks(tokens, temb), temb))            for s = 0, 1

with ``sigma_s = 1 - t_s`` per stage. The new layers live inside the modules they extend (``x_embedder.stages.0``,
``time_text_embed.stages.0``, ``norm_out.stages.0``, ``proj_out.stages.0``); every FLUX parameter keeps its name, so
diffusers' forward (gradient checkpointing, LoRA, ZeRO-3 hooks) runs unchanged on the concatenated stage tokens.

Training and sampling are :class:`pipeline.transport.multiscale.DFMObjective`'s (stage draw ``q ~ p_q``, earlier
stages nearly clean, later ones zero and masked; stage-wise Euler with threshold ``tau``) over :class:`StageVelocity`,
which maps its ``model(stage latents, times (B, S)) -> stage velocities`` interface onto the FLUX-DFM transformer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainJobConfig
from pipeline.flux.objective import batched, flux_batch, require_text, unwrap
from pipeline.flux.packing import image_ids, pack_latents, text_ids, unpack_latents
from pipeline.models.dfm import stage_patch_sizes
from pipeline.families import SampleOutput
from pipeline.transport.multiscale import (
    DFMObjective,
    default_stage_probs,
    default_stage_steps,
)
from pipeline.transport.paths import LinearPath

STAGES = 2  # FLUX packs 2x2: a coarser stage than 1 latent pixel per token would change the token count
FLUX_PATCH = 2
STAGE_FILE = "flux_dfm_stages.safetensors"  # an exported fine-tune's stage layers (next to the LoRA / folder)
REPLACED = ("x_embedder", "proj_out")  # modules turned into stage modules: not LoRA-targetable under DFM


class StageEmbed(nn.Module):
    """Patch embedding over concatenated stage tokens (coarse first): ``W x_S + b + sum_s E_s(x_s)``."""

    def __init__(self, base: nn.Linear, coarse_widths: Sequence[int]) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the pretrained (finest-stage) embedding, same tensors
        self.widths = [*coarse_widths, base.in_features]
        self.stages = nn.ModuleList(nn.Linear(w, base.out_features) for w in coarse_widths).to(
            base.weight.device, base.weight.dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        parts = tokens.split(self.widths, dim=-1)
        out = F.linear(parts[-1], self.weight, self.bias)
        for layer, part in zip(self.stages, parts):
            out = out + layer(part)
        return out


class StageTimeEmbed(nn.Module):
    """FLUX's time(/guidance)/text embedder on the finest stage's time plus one timestep embedder per coarse stage.

    ``forward(timestep (B, S), [guidance,] pooled)``; the pretrained embedder's children keep their names and its
    own ``forward`` is applied to them (``sigma`` arrives multiplied by 1000, as FLUX's forward passes it).
    """

    def __init__(self, base: nn.Module, coarse: int) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding

        for name, child in base.named_children():
            self.add_module(name, child)
        self._base_forward = type(base).forward
        dim = base.timestep_embedder.linear_2.out_features
        ref = base.timestep_embedder.linear_1.weight
        self.stages = nn.ModuleList(TimestepEmbedding(base.timestep_embedder.linear_1.in_features, dim)
                                    for _ in range(coarse)).to(ref.device, ref.dtype)

    def forward(self, timestep: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        emb = self._base_forward(self, timestep[:, -1], *rest)
        for s, layer in enumerate(self.stages):
            emb = emb + layer(self.time_proj(timestep[:, s]).to(rest[-1].dtype))
        return emb


class StageNormOut(nn.Module):
    """One adaLN output norm per stage; returns the stages' normalised tokens side by side (B, N, S*D)."""

    def __init__(self, base: nn.Module, coarse: int) -> None:
        super().__init__()
        import copy

        for name, child in base.named_children():
            self.add_module(name, child)
        self._base_forward = type(base).forward
        self.stages = nn.ModuleList(copy.deepcopy(base) for _ in range(coarse))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return torch.cat([*(norm(x, emb) for norm in self.stages), self._base_forward(self, x, emb)], dim=-1)


class StageProj(nn.Module):
    """Per-stage output projections of :class:`StageNormOut`'s side-by-side tokens, concatenated (coarse first)."""

    def __init__(self, base: nn.Linear, coarse_widths: Sequence[int]) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.hidden = base.in_features
        self.stages = nn.ModuleList(nn.Linear(base.in_features, w) for w in coarse_widths).to(
            base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.hidden, dim=-1)
        outs = [layer(part) for layer, part in zip(self.stages, parts)]
        return torch.cat([*outs, F.linear(parts[-1], self.weight, self.bias)], dim=-1)


def is_flux_dfm(model: nn.Module) -> bool:
    return isinstance(getattr(unwrap(model), "x_embedder", None), StageEmbed)


def stage_channels(model: nn.Module) -> int:
    """Latent channels of a (FLUX-DFM) transformer: its packed input width / 4."""
    return unwrap(model).config.in_channels // FLUX_PATCH**2


@torch.no_grad()
def zero_stage_layers(model: nn.Module) -> None:
    """Zero every coarse-stage layer's output, so the model equals the pretrained FLUX on the finest stage."""
    inner = unwrap(model)
    for layer in inner.x_embedder.stages:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    for temb in inner.time_text_embed.stages:
        nn.init.zeros_(temb.linear_2.weight)
        nn.init.zeros_(temb.linear_2.bias)
    for norm in inner.norm_out.stages:
        nn.init.zeros_(norm.linear.weight)
        if norm.linear.bias is not None:
            nn.init.zeros_(norm.linear.bias)
    for layer in inner.proj_out.stages:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def to_flux_dfm(model: nn.Module) -> nn.Module:
    """Turn a FLUX transformer into a two-stage FLUX-DFM in place (its own tensors reused; a no-op if it is one)."""
    if is_flux_dfm(model):
        return model
    inner = unwrap(model)
    if not all(isinstance(m, nn.Linear) for m in (inner.x_embedder, inner.proj_out)):
        raise ValueError("flux.dfm=true: the FLUX transformer's x_embedder/proj_out are not plain linear layers "
                         "(a LoRA on them? remove them from flux.lora_targets)")
    channels = stage_channels(inner)
    out_channels = inner.proj_out.out_features // FLUX_PATCH**2
    patches = stage_patch_sizes(FLUX_PATCH, STAGES)[:-1]
    inner.x_embedder = StageEmbed(inner.x_embedder, [channels * p * p for p in patches])
    inner.time_text_embed = StageTimeEmbed(inner.time_text_embed, len(patches))
    inner.norm_out = StageNormOut(inner.norm_out, len(patches))
    inner.proj_out = StageProj(inner.proj_out, [out_channels * p * p for p in patches])
    zero_stage_layers(inner)
    return model


def stage_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the coarse-stage layers (the ones FLUX-DFM adds)."""
    return [(n, p) for n, p in unwrap(model).named_parameters() if ".stages." in n]


def load_stage_layers(model: nn.Module, export_dir: str | Path) -> nn.Module:
    """Make ``model`` (a FLUX transformer with the exported LoRA or weights) a FLUX-DFM with the exported stages."""
    from safetensors.torch import load_file

    path = Path(export_dir) / STAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {STAGE_FILE} in {export_dir}: not a FLUX-DFM export")
    model = to_flux_dfm(model)
    state = load_file(str(path))
    expected = {n for n, _ in stage_parameters(model)}
    if set(state) != expected:
        raise ValueError(f"{path} does not fit this FLUX-DFM (stage tensors {sorted(set(state) ^ expected)[:2]})")
    unwrap(model).load_state_dict(state, strict=False)
    return model


class StageVelocity:
    """DFM's model interface over a FLUX-DFM transformer with fixed text conditioning.

    ``(xs: [stage latents, coarse first], t: (B, S)) -> [project-convention velocity per stage]``: stage tokens are
    packed and concatenated, ``sigma_s = 1 - t_s`` is the per-stage timestep, and, as for plain FLUX
    (:func:`pipeline.flux.objective.flux_velocity`), the network's ``d x / d sigma`` is negated.
    """

    def __init__(self, model: nn.Module, t5: torch.Tensor, clip_pooled: torch.Tensor, guidance: float | None) -> None:
        self.model, self.t5, self.clip_pooled, self.guidance = model, t5, clip_pooled, guidance

    def parameters(self):
        return unwrap(self.model).parameters()

    def __call__(self, xs: Sequence[torch.Tensor], t: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        inner = unwrap(self.model)
        if not is_flux_dfm(inner):
            raise ValueError("flux.dfm=true needs a FLUX-DFM transformer (see pipeline.flux.dfm.to_flux_dfm)")
        dtype = inner.x_embedder.weight.dtype
        patches = stage_patch_sizes(FLUX_PATCH, len(xs))
        b, (h, w) = xs[-1].shape[0], xs[-1].shape[-2:]
        tokens = torch.cat([pack_latents(x, p) for x, p in zip(xs, patches)], dim=-1).to(dtype)
        guidance = None
        if inner.config.guidance_embeds:
            value = 1.0 if self.guidance is None else float(self.guidance)
            guidance = torch.full((b,), value, device=tokens.device, dtype=dtype)
        out = self.model(hidden_states=tokens, encoder_hidden_states=self.t5.to(dtype),
                         pooled_projections=self.clip_pooled.to(dtype), timestep=(1.0 - t).to(dtype),
                         guidance=guidance, img_ids=image_ids(h, w, device=tokens.device),
                         txt_ids=text_ids(self.t5.shape[1], device=tokens.device), return_dict=False)[0]
        parts = out.float().split([x.shape[1] * p * p for x, p in zip(xs, patches)], dim=-1)
        return [-unpack_latents(part, x.shape[-2], x.shape[-1], p) for part, x, p in zip(parts, xs, patches)]


@dataclass
class FluxDFMObjective:
    """Two-stage DFM on FLUX latents; implements :class:`pipeline.objective.Objective` with
    :class:`~pipeline.transport.multiscale.DFMObjective`'s loss and stage-wise sampler (rectified-flow path)."""

    dfm: DFMObjective
    guidance: float = 1.0

    @classmethod
    def from_config(cls, cfg: TrainJobConfig) -> FluxDFMObjective:
        m, tr = cfg.model, cfg.transport
        if cfg.flux.loss_weighting != "none":
            raise ValueError(f"flux.loss_weighting={cfg.flux.loss_weighting} does not apply with flux.dfm=true "
                             "(DFM weighs its stages by model.dfm_stage_probs)")
        probs = m.dfm_stage_probs or default_stage_probs(STAGES)
        steps = m.dfm_stage_steps or default_stage_steps(cfg.sampler.steps, STAGES)
        shift = cfg.sampler.time_shift
        dfm = DFMObjective(stages=STAGES, stage_probs=list(probs), stage_steps=list(steps), threshold=m.dfm_threshold,
                           path=LinearPath(), logit_mean=tr.logit_mean, logit_std=tr.logit_std, time_cfg=tr,
                           train_eps=tr.train_eps or 0.0, solver=cfg.sampler.solver,
                           time_shift=1.0 if shift is None else float(shift))
        return cls(dfm=dfm, guidance=cfg.flux.guidance)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x1, t5, pooled = flux_batch(batch)
        return self.dfm.loss(StageVelocity(model, t5, pooled, self.guidance), {"image": x1})

    @torch.no_grad()
    def sample(self, model: nn.Module, cond: dict[str, torch.Tensor], shape: tuple[int, ...],
               generator: torch.Generator | None = None) -> SampleOutput:
        """Stage-wise Euler (``model.dfm_stage_steps``, threshold ``model.dfm_threshold``); returns latents."""
        require_text(cond)
        b = shape[0]
        t5, pooled = batched(cond["t5"], b, "t5"), batched(cond["clip_pooled"], b, "clip_pooled")
        return self.dfm.sample(StageVelocity(model, t5, pooled, self.guidance), {}, shape, generator)
