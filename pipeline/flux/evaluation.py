"""Sampling a FLUX fine-tune for evaluation (``flowrail evaluate``, evaluation during training, sweeps).

Evaluation is class-balanced over labels; a FLUX model has captions instead. :func:`flux_eval_view` turns the
first distinct captions of the run's shard set (``data.val_shards``, else ``data.shards``; their pre-encoded T5
and CLIP embeddings) into the "classes": label ``l`` samples with caption ``l``, one grid row per caption.

A sample whose caption is empty is not a class: its embeddings are the empty prompt that true classifier-free
guidance (``guidance.scale > 1``) contrasts with.

Samples come from the run's objective: ``sampler.solver`` from noise (t = 0) to data (t = 1) on the shifted
schedule (``sampler.time_shift``, FLUX's resolution shift by default) with ``sampler.steps`` steps and the
``flux.guidance`` embedding value (:meth:`pipeline.flux.objective.FluxObjective.
sample`; the stage-wise DFM sampler with ``flux.dfm``). They are FLUX latents ``(z - shift) * scale``; the view
returns them as ``scale * z`` (``+ shift * scale``), the convention every flowrail latent set is decoded with
(:func:`pipeline.data.encode.decode_latents_from_info`: ``D(x / scale)``), so the autoencoder (``flux.autoencoder``,
else the shard set's ``vae``) decodes them to images.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.families import SampleOutput

MAX_PROMPTS = 8  # grid rows; evaluation cycles through them
SCAN_RECORDS = 1024  # how far into the shard set distinct captions are looked for


@dataclass
class PromptSampler:
    """An objective whose ``sample`` maps labels to caption embeddings and returns ``scale * z`` latents."""

    objective: Any  # FluxObjective or FluxDFMObjective
    t5: torch.Tensor  # (K, L, D_t5)
    clip_pooled: torch.Tensor  # (K, D_clip)
    captions: list[str]
    shift: float
    scale: float
    uncond: tuple[torch.Tensor, torch.Tensor] | None = None  # the empty prompt's (t5 (1, L, D), clip_pooled (1, D))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.objective.loss(model, batch)

    @torch.no_grad()
    def sample(self, model: nn.Module, cond: dict[str, torch.Tensor], shape: tuple[int, ...],
               generator: torch.Generator | None = None) -> SampleOutput:
        """``cond["label"]`` (B,) picks caption ``label % K``; returns ``latent + shift * scale``."""
        idx = cond["label"].long().cpu() % len(self.captions)
        device = next(model.parameters()).device
        cond = {"t5": self.t5[idx].to(device), "clip_pooled": self.clip_pooled[idx].to(device)}
        if self.uncond is not None:
            cond.update(t5_uncond=self.uncond[0].to(device), clip_pooled_uncond=self.uncond[1].to(device))
        out = self.objective.sample(model, cond, shape, generator)
        return SampleOutput(x=out.x + self.shift * self.scale, nfe=out.nfe)


def empty_prompt(shards: str | Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The embeddings ``(t5 (1, L, D), clip_pooled (1, D))`` of an empty caption in the set's first records, if any."""
    from pipeline.data.shards import iter_samples

    for i, (_, sample) in enumerate(iter_samples(shards)):
        if i >= SCAN_RECORDS:
            break
        if str(sample.get("txt", "x")).strip() == "" and "t5.npy" in sample and "clip_pooled.npy" in sample:
            return (torch.from_numpy(np.asarray(sample["t5.npy"], dtype=np.float32))[None],
                    torch.from_numpy(np.asarray(sample["clip_pooled.npy"], dtype=np.float32))[None])
    return None


def eval_prompts(shards: str | Path, limit: int = MAX_PROMPTS) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(t5 (K, L, D), clip_pooled (K, D), captions)`` of the first ``K <= limit`` distinct non-empty captions."""
    from pipeline.data.shards import iter_samples

    t5, pooled, captions = [], [], []
    for i, (key, sample) in enumerate(iter_samples(shards)):
        if i >= SCAN_RECORDS or len(captions) >= limit:
            break
        if "t5.npy" not in sample or "clip_pooled.npy" not in sample:
            raise ValueError(f"shard set {shards}: sample {key} has no t5.npy/clip_pooled.npy "
                             "(pre-encode it with `flowrail flux_encode`)")
        caption = str(sample.get("txt", key))
        if caption in captions or not caption.strip():
            continue
        captions.append(caption)
        t5.append(np.asarray(sample["t5.npy"], dtype=np.float32))
        pooled.append(np.asarray(sample["clip_pooled.npy"], dtype=np.float32))
    if not captions:
        raise ValueError(f"shard set {shards} holds no samples to take evaluation captions from")
    return torch.from_numpy(np.stack(t5)), torch.from_numpy(np.stack(pooled)), captions


def _autoencoder_factors(folder: str | None) -> tuple[float | None, float | None]:
    """``(shift_factor, scaling_factor)`` from a local autoencoder folder's config.json (None where unknown)."""
    config = Path(folder) / "config.json" if folder else None
    if config is None or not config.is_file():
        return None, None
    data = json.loads(config.read_text())
    return data.get("shift_factor"), data.get("scaling_factor")


def flux_eval_view(trained: Any, cfg: Any) -> Any:
    """``trained`` (a :class:`pipeline.train.checkpoint.Trained` of a FLUX run) sampling captions as classes.

    Returns ``trained`` itself for other models or when it already is such a view.
    """
    if cfg.model.name.lower() != "flux" or isinstance(trained.objective, PromptSampler):
        return trained
    from pipeline.data.shards import read_manifest

    shards = cfg.data.val_shards or cfg.data.shards
    if not shards:
        raise ValueError("evaluating a FLUX model needs data.val_shards or data.shards (captions to sample)")
    t5, pooled, captions = eval_prompts(shards)
    manifest = read_manifest(shards)
    vae = cfg.flux.autoencoder or trained.data.vae
    vae_shift, vae_scale = _autoencoder_factors(vae)
    shift = manifest.get("shift_factor", vae_shift) or 0.0
    scale = trained.data.latent_scale or manifest.get("latent_scale") or vae_scale or 1.0
    uncond = empty_prompt(shards) if cfg.guidance.scale != 1.0 else None
    if cfg.guidance.scale != 1.0 and uncond is None:
        raise ValueError(f"guidance.scale={cfg.guidance.scale} on FLUX is true CFG against the empty prompt: shard set "
                         f"{shards} holds no sample with an empty caption to take its embeddings from (add one "
                         "and re-encode with `flowrail flux_encode`, or set guidance.scale=1)")
    sampler = PromptSampler(objective=trained.objective, t5=t5, clip_pooled=pooled, captions=captions,
                            shift=float(shift), scale=float(scale), uncond=uncond)
    data = dataclasses.replace(trained.data, num_classes=len(captions), vae=vae, latent_scale=float(scale))
    return dataclasses.replace(trained, objective=sampler, data=data)
