"""SiT: a DiT backbone (adaLN-Zero transformer over latent/pixel patches) predicting the transport field.

Parts, named as in the SiT/DiT papers and their released ``models.py`` (so official checkpoints load by name):

- ``x_embedder.proj``: patchify, a ``p x p`` stride-``p`` convolution to ``hidden_size`` channels.
- ``pos_embed``: fixed 2-D sin-cos position embedding, a frozen parameter (it is in official state dicts).
- ``t_embedder.mlp.{0,2}``: sinusoidal features of ``t`` (256 frequencies, ``cos`` then ``sin``) then an MLP.
  SiT feeds ``t in [0, 1]`` as is (no x1000 as in DiT's discrete diffusion).
- ``y_embedder.embedding_table``: ``num_classes + 1`` rows; the last row is the null label used for
  classifier-free guidance. During training labels are replaced by the null label with ``class_dropout_prob``.
- ``blocks.N``: adaLN-Zero blocks. ``c = t_emb + y_emb``; ``(shift, scale, gate) x 2 = Linear(SiLU(c))``;
  ``x += gate_msa * Attn(LN(x) (1 + scale_msa) + shift_msa)``; ``x += gate_mlp * MLP(LN(x) (1 + scale_mlp) + shift_mlp)``.
  The modulation layer is zero-initialised, so every block starts as the identity.
- ``final_layer``: adaLN-modulated LayerNorm, then a zero-initialised linear map to ``p * p * out_channels``.

``learn_sigma`` doubles the output channels as in SiT; like SiT's ``forward``, the extra half is dropped, so the
model always returns a field with ``in_channels`` channels.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.zero_init import gathered_for_init

FREQUENCY_EMBEDDING_SIZE = 256


@dataclass(frozen=True)
class SiTSize:
    depth: int
    hidden_size: int
    num_heads: int


SIZES: dict[str, SiTSize] = {  # REFERENCE.md section 5
    "S": SiTSize(12, 384, 6),
    "B": SiTSize(12, 768, 12),
    "L": SiTSize(24, 1024, 16),
    "XL": SiTSize(28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
_NAME = re.compile(r"^(?:SiT|DiT)-(S|B|L|XL)/(\d+)$", re.IGNORECASE)


def parse_named_config(name: str) -> tuple[SiTSize, int] | None:
    """``"SiT-XL/2"`` -> (size, patch). ``None`` if ``name`` is not of the SiT-<size>/<patch> form."""
    m = _NAME.match(name.strip())
    if m is None:
        return None
    size, patch = m.group(1).upper(), int(m.group(2))
    if patch not in PATCH_SIZES:
        raise ValueError(f"model.name={name}: patch size {patch} is not one of {PATCH_SIZES}")
    return SIZES[size], patch


# ---------------------------------------------------------------- embeddings


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """``[sin(pos w_k), cos(pos w_k)]`` with ``w_k = 10000^(-k / (D/2))``, k < D/2."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D position embedding (grid_size^2, D): half the channels encode one axis, half the other."""
    if embed_dim % 4:
        raise ValueError(f"hidden_size={embed_dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # (h, w) arrays; the first half uses the column index
    return np.concatenate([sincos_1d(embed_dim // 2, grid_w), sincos_1d(embed_dim // 2, grid_h)], axis=1)


def timestep_features(t: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(t f_k), sin(t f_k)]`` with ``f_k = max_period^(-k / (dim/2))``; ``t`` is (B,) in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p)(W/p), D) by a stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): sinusoidal features then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.frequency_embedding_size)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> (B, D); label ``num_classes`` is the null (unconditional) label."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        """Negative labels (unlabelled data) mean the null label."""
        labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


# ---------------------------------------------------------------- transformer


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and PyTorch's scaled-dot-product kernel."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN LayerNorm then a linear map from tokens to ``p * p * out_channels`` values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

    def zero_(self) -> None:
        for layer in (self.adaLN_modulation[-1], self.linear):
            with gathered_for_init(layer):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: int) -> torch.Tensor:
    """(B, grid^2, p*p*C) -> (B, C, grid*p, grid*p); token values are ordered (p_row, p_col, C)."""
    b = x.shape[0]
    x = x.reshape(b, grid, grid, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, grid * patch_size, grid * patch_size)


class SiT(nn.Module):
    """Class-conditional SiT/DiT: ``forward(x (B,C,H,W), t (B,) in [0,1], y (B,) int) -> (B, C, H, W)``."""

    def __init__(self, *, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, grad_checkpointing: bool = False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by model.patch_size={patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"model.hidden_size={hidden_size} must be divisible by model.num_heads={num_heads}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing
        self.grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_label(self) -> int:
        return self.num_classes

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, fixed sin-cos positions, adaLN-Zero, zero output layer."""
        def _xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                with gathered_for_init(module):  # one layer at a time under deepspeed.zero.Init
                    nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

        self.apply(_xavier)
        with gathered_for_init(self.pos_embed, self.x_embedder, self.y_embedder, self.t_embedder):
            if self.pos_embed.device.type != "meta":
                self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.hidden_size, self.grid_size)).float()[None])
            w = self.x_embedder.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.x_embedder.proj.bias)
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            with gathered_for_init(block.adaLN_modulation[-1]):
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        self.final_layer.zero_()

    def label_embedding(self, y: torch.Tensor | None, batch: int, device: torch.device,
                        dropout: bool | None = None) -> torch.Tensor:
        """``y_emb(y)`` with label dropout (default: in training mode); ``y=None`` means unconditional (null label)."""
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.y_embedder(y, self.training if dropout is None else dropout)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """``c = t_emb(t) + y_emb(y)``."""
        return self.t_embedder(t) + self.label_embedding(y, t.shape[0], t.device)

    def run_blocks(self, tokens: torch.Tensor, c: torch.Tensor, blocks: nn.ModuleList | None = None) -> torch.Tensor:
        for block in self.blocks if blocks is None else blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        return tokens

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                target_time: torch.Tensor | None = None, decoupled_blocks: int = 0,
                label_dropout: bool | None = None) -> torch.Tensor:
        """The velocity ``v(x, t | y)``; with ``target_time`` the Decoupled MeanFlow average velocity ``u(x, t, r)``.

        Decoupled conditioning (no new layers): the first ``depth - k`` blocks see ``c = t_emb(t) + y_emb`` (the
        current time), the last ``k = decoupled_blocks`` blocks and the final layer see ``c_r = t_emb(r) + y_emb``
        (``r = target_time``), one label embedding (one dropout draw) shared by both. With ``r = t`` this is
        exactly the plain forward pass, i.e. the pretrained flow model. ``label_dropout``: None drops labels in
        training mode (``class_dropout_prob``); False never (callers that drop labels themselves, e.g. the flow-map
        objective, whose finite-difference passes must see the same labels).
        """
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        y_emb = self.label_embedding(y, x.shape[0], x.device, label_dropout)
        c = self.t_embedder(t) + y_emb
        split = self.depth
        c_out = c
        if target_time is not None:
            if not 1 <= decoupled_blocks <= self.depth:
                raise ValueError(f"decoupled_blocks={decoupled_blocks} must be in 1..{self.depth} (the model depth)")
            r = torch.as_tensor(target_time, dtype=t.dtype, device=t.device)
            r = r.expand(x.shape[0]) if r.dim() == 0 else r
            split = self.depth - decoupled_blocks
            c_out = self.t_embedder(r) + y_emb
        if split == self.depth:
            tokens = self.run_blocks(tokens, c)
        else:
            tokens = self.run_blocks(tokens, c, self.blocks[:split])
            tokens = self.run_blocks(tokens, c_out, self.blocks[split:])
        out = unpatchify(self.final_layer(tokens, c_out), self.patch_size, self.out_channels, self.grid_size)
        if self.learn_sigma:
            out = out[:, : self.in_channels]
        return out


def build_sit(name: str | None = None, *, in_channels: int, input_size: int, num_classes: int,
              hidden_size: int = 384, depth: int = 12, num_heads: int = 6, patch_size: int = 2,
              mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1, learn_sigma: bool = False,
              grad_checkpointing: bool = False) -> SiT:
    """A named SiT (``SiT-XL/2``; the size fields are then ignored) or a custom-sized one."""
    if name is not None:
        parsed = parse_named_config(name)
        if parsed is None:
            raise ValueError(f"model.name={name} is not a SiT config (expected SiT-{{S,B,L,XL}}/{{2,4,8}})")
        size, patch_size = parsed
        hidden_size, depth, num_heads, mlp_ratio = size.hidden_size, size.depth, size.num_heads, 4.0
    return SiT(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
               depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
               num_classes=num_classes, learn_sigma=learn_sigma, grad_checkpointing=grad_checkpointing)
