"""Decomposable Flow Matching (DFM) model: one SiT transformer over all stages of a Laplacian pyramid.

Stage ``s = 0 .. S-1`` (coarse to fine) has resolution ``H / 2^(S-1-s)`` and patch size ``p / 2^(S-1-s)``, so every
stage gives the same ``(H/p)^2`` tokens. The token sequence is the sum of the stage patch embeddings (plus the shared
position table); the conditioning is the sum of one timestep embedding per stage plus the label embedding; each
stage has its own zero-initialised adaLN final layer.

Parameter names extend SiT's: the finest stage uses SiT's ``x_embedder`` / ``t_embedder`` / ``final_layer``, the
coarser stages ``stage_x_embedders.i`` / ``stage_t_embedders.i`` / ``stage_final_layers.i``. An official SiT
checkpoint therefore loads into a DFM model with only the new stage layers missing; those are then zeroed, so the
model starts as the pretrained SiT acting on the finest stage (see :func:`dfm_from_sit`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.models.sit import FinalLayer, PatchEmbed, SiT, TimestepEmbedder, unpatchify
from pipeline.models.zero_init import gathered_for_init


def stage_patch_sizes(patch_size: int, stages: int) -> list[int]:
    """Patch size of each stage (coarse first) giving equal token counts: ``p / 2^(S-1-s)``."""
    factor = 2 ** (stages - 1)
    if patch_size % factor:
        raise ValueError(f"model.patch_size={patch_size} cannot give equal token counts for model.dfm_stages={stages} "
                         f"(it must be a multiple of {factor})")
    return [patch_size // 2 ** (stages - 1 - s) for s in range(stages)]


class DFM(SiT):
    """``forward(xs: [stage tensors, coarse first], t: (B, S), y: (B,)) -> [velocity per stage]``."""

    IMPORT_OPTIONAL_PREFIXES = ("stage_",)

    def __init__(self, *, stages: int = 2, input_size: int = 32, patch_size: int = 2, **kw):
        if stages < 1:
            raise ValueError(f"model.dfm_stages={stages} must be >= 1")
        patches = stage_patch_sizes(patch_size, stages)
        super().__init__(input_size=input_size, patch_size=patch_size, **kw)
        self.stages = stages
        self.stage_patch_sizes = patches
        coarse = patches[:-1]
        self.stage_x_embedders = nn.ModuleList(PatchEmbed(p, self.in_channels, self.hidden_size) for p in coarse)
        self.stage_t_embedders = nn.ModuleList(TimestepEmbedder(self.hidden_size) for _ in coarse)
        self.stage_final_layers = nn.ModuleList(FinalLayer(self.hidden_size, p, self.out_channels) for p in coarse)
        self._init_stage_layers()

    def stage_sizes(self) -> list[int]:
        return [self.input_size // 2 ** (self.stages - 1 - s) for s in range(self.stages)]

    def _init_stage_layers(self) -> None:
        """From-scratch initialisation of the coarse-stage layers, as SiT's: xavier, N(0, 0.02), zero output."""
        for emb in self.stage_x_embedders:
            with gathered_for_init(emb):  # under deepspeed.zero.Init: one layer gathered at a time
                nn.init.xavier_uniform_(emb.proj.weight.view(emb.proj.weight.shape[0], -1))
                nn.init.zeros_(emb.proj.bias)
        for temb in self.stage_t_embedders:
            with gathered_for_init(temb):
                for i in (0, 2):
                    nn.init.normal_(temb.mlp[i].weight, std=0.02)
                    nn.init.zeros_(temb.mlp[i].bias)
        for final in self.stage_final_layers:
            final.zero_()

    def zero_stage_layers(self) -> None:
        """Zero every coarse-stage layer's output, so the model equals its SiT core on the finest stage."""
        for emb in self.stage_x_embedders:
            with gathered_for_init(emb):
                nn.init.zeros_(emb.proj.weight)
                nn.init.zeros_(emb.proj.bias)
        for temb in self.stage_t_embedders:
            with gathered_for_init(temb):
                nn.init.zeros_(temb.mlp[2].weight)
                nn.init.zeros_(temb.mlp[2].bias)
        for final in self.stage_final_layers:
            final.zero_()

    def after_import(self, fresh_keys: Sequence[str]) -> None:
        """Called by checkpoint import: stage layers absent from a (SiT) checkpoint start at zero."""
        if any(k.startswith(self.IMPORT_OPTIONAL_PREFIXES) for k in fresh_keys):
            self.zero_stage_layers()

    def _stage_layers(self, s: int) -> tuple[PatchEmbed, TimestepEmbedder, FinalLayer]:
        if s == self.stages - 1:
            return self.x_embedder, self.t_embedder, self.final_layer
        return self.stage_x_embedders[s], self.stage_t_embedders[s], self.stage_final_layers[s]

    def forward(self, xs: Sequence[torch.Tensor], t: torch.Tensor, y: torch.Tensor | None = None
                ) -> list[torch.Tensor]:
        if len(xs) != self.stages:
            raise ValueError(f"DFM expects {self.stages} stage tensors, got {len(xs)}")
        if t.dim() == 1:
            t = t[:, None].expand(-1, self.stages)
        tokens = self.pos_embed.to(xs[-1].dtype)
        c = self.label_embedding(y, t.shape[0], t.device)
        for s, x in enumerate(xs):
            x_emb, t_emb, _ = self._stage_layers(s)
            tokens = tokens + x_emb(x)
            c = c + t_emb(t[:, s])
        tokens = self.run_blocks(tokens, c)
        outs = []
        for s in range(self.stages):
            final = self._stage_layers(s)[2]
            out = unpatchify(final(tokens, c), self.stage_patch_sizes[s], self.out_channels, self.grid_size)
            outs.append(out[:, : self.in_channels])
        return outs


def dfm_from_sit(sit: SiT, stages: int = 2) -> DFM:
    """A DFM model whose shared layers are ``sit``'s (copied) and whose new stage layers are zero-initialised.

    At initialisation its finest-stage output equals ``sit(x_fine, t_fine, y)`` whatever the coarse inputs.
    """
    model = DFM(stages=stages, input_size=sit.input_size, patch_size=sit.patch_size, in_channels=sit.in_channels,
                hidden_size=sit.hidden_size, depth=sit.depth, num_heads=sit.num_heads, mlp_ratio=sit.mlp_ratio,
                class_dropout_prob=sit.y_embedder.dropout_prob, num_classes=sit.num_classes,
                learn_sigma=sit.learn_sigma, grad_checkpointing=sit.grad_checkpointing)
    model.to(device=sit.pos_embed.device, dtype=sit.pos_embed.dtype)
    missing, unexpected = model.load_state_dict(sit.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(DFM.IMPORT_OPTIONAL_PREFIXES) for k in missing)
    model.zero_stage_layers()
    return model
