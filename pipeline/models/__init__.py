"""Model families behind one constructor: SiT (named or custom size), DFM and FLUX."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models.checkpoint_import import export_safetensors, load_official_checkpoint
from pipeline.models.dfm import DFM, dfm_from_sit
from pipeline.models.sit import SiT, build_sit, parse_named_config

__all__ = ["DFM", "SiT", "build_model", "build_sit", "count_parameters", "dfm_from_sit", "export_safetensors",
           "load_official_checkpoint", "parse_named_config"]


def build_model(cfg: ModelConfig, *, in_channels: int, input_size: int, num_classes: int,
                flux_cfg: Any = None, flux_dtype: torch.dtype | None = None, partitioned: bool = False) -> nn.Module:
    """Build the network named by ``cfg.name``.

    - ``sit``: custom size from ``hidden_size``/``depth``/``num_heads``/``patch_size``/``mlp_ratio``.
    - ``SiT-{S,B,L,XL}/{2,4,8}`` (or ``DiT-...``): the paper sizes; the size fields of ``cfg`` are ignored.
    - ``dfm``: a Decomposable Flow Matching model whose base transformer has the custom size fields.
    - ``flux``: delegated to :func:`pipeline.flux.model.build_flux_model` with ``flux_cfg``, loaded in
      ``flux_dtype`` (None: as stored; a LoRA run passes its training dtype so the frozen base stays bf16).

    ``partitioned``: the caller builds inside ``deepspeed.zero.Init`` (ZeRO-3); SiT/DFM initialise one layer at a
    time (:mod:`pipeline.models.zero_init`), FLUX streams its weights into the partitions.
    """
    name = cfg.name.strip()
    common = dict(in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                  class_dropout_prob=cfg.class_dropout_prob, learn_sigma=cfg.learn_sigma,
                  grad_checkpointing=cfg.grad_checkpointing)
    custom = dict(hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
                  patch_size=cfg.patch_size, mlp_ratio=cfg.mlp_ratio)
    lowered = name.lower()
    if lowered == "sit":
        return build_sit(None, **custom, **common)
    if parse_named_config(name) is not None:
        return build_sit(name, **common)
    if lowered == "dfm":
        return DFM(stages=cfg.dfm_stages, **custom, **common)
    if lowered == "flux":
        from pipeline.flux.model import build_flux_model

        return build_flux_model(flux_cfg, torch_dtype=flux_dtype, partitioned=partitioned)
    raise ValueError(f"model.name={name} is unknown (allowed: sit, SiT-{{S,B,L,XL}}/{{2,4,8}}, dfm, flux)")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (works on the 'meta' device)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
