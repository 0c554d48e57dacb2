"""FLUX transformer loading from local files only: diffusers folders and original-format single files."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import FluxTransformer2DModel  # noqa: E402

from pipeline.config import FluxConfig  # noqa: E402
from pipeline.flux.model import build_flux_model, infer_bfl_config, tiny_flux_config  # noqa: E402

# ------------------------------------------------------------------ an original-format file from a diffusers one
# The key mapping is the inverse of the facts encoded in diffusers' own converter
# (diffusers.loaders.single_file_utils.convert_flux_transformer_checkpoint_to_diffusers): fused q/k/v in double
# blocks, fused q/k/v/mlp-in (linear1) in single blocks, shift/scale halves swapped in the final norm.

_RENAMES_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_RENAMES_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
_NORMS_DOUBLE = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                 "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                 "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                 "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
_NORMS_SINGLE = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}


def diffusers_to_bfl(sd: dict[str, torch.Tensor], num_layers: int, num_single_layers: int) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in original BFL key names."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    for kind in ("weight", "bias"):
        for src, dst in _RENAMES_TOP.items():
            if f"{src}.{kind}" in sd:
                out[f"{dst}.{kind}"] = sd.pop(f"{src}.{kind}")
        scale, shift = sd.pop(f"norm_out.linear.{kind}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
        for i in range(num_layers):
            p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            for src, dst in _RENAMES_DOUBLE.items():
                out[f"{q}{dst}.{kind}"] = sd.pop(f"{p}{src}.{kind}")
            out[f"{q}img_attn.qkv.{kind}"] = torch.cat([sd.pop(f"{p}attn.to_{c}.{kind}") for c in "qkv"])
            out[f"{q}txt_attn.qkv.{kind}"] = torch.cat([sd.pop(f"{p}attn.add_{c}_proj.{kind}") for c in "qkv"])
        for i in range(num_single_layers):
            p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            out[f"{q}modulation.lin.{kind}"] = sd.pop(f"{p}norm.linear.{kind}")
            out[f"{q}linear2.{kind}"] = sd.pop(f"{p}proj_out.{kind}")
            parts = [sd.pop(f"{p}attn.to_{c}.{kind}") for c in "qkv"] + [sd.pop(f"{p}proj_mlp.{kind}")]
            out[f"{q}linear1.{kind}"] = torch.cat(parts)
    for i in range(num_layers):
        for src, dst in _NORMS_DOUBLE.items():
            out[f"double_blocks.{i}.{dst}"] = sd.pop(f"transformer_blocks.{i}.{src}")
    for i in range(num_single_layers):
        for src, dst in _NORMS_SINGLE.items():
            out[f"single_blocks.{i}.{dst}"] = sd.pop(f"single_transformer_blocks.{i}.{src}")
    assert not sd, f"unmapped diffusers keys: {sorted(sd)}"
    return out


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every tensor (zero-initialised ones included) distinct random values, so a wrong mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = _randomized(FluxTransformer2DModel.from_config(tiny_flux_config(guidance_embeds=True)))
    root = tmp_path_factory.mktemp("flux")
    pipe = root / "pipe"
    model.save_pretrained(pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    bfl = diffusers_to_bfl(model.state_dict(), num_layers=1, num_single_layers=1)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in bfl.items()},
              str(root / "flux-tiny.safetensors"))
    return model, root


def _forward(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 64, generator=gen)
    txt = torch.randn(2, 5, 32, generator=gen)
    pooled = torch.randn(2, 16, generator=gen)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1] = torch.arange(16) // 4
    img_ids[:, 2] = torch.arange(16) % 4
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled,
                     timestep=torch.tensor([0.3, 0.8]), img_ids=img_ids, txt_ids=torch.zeros(5, 3),
                     guidance=torch.tensor([3.5, 3.5])).sample


def test_diffusers_folder_root_and_subfolder_load_same_weights(tiny):
    model, root = tiny
    for path in (root / "pipe", root / "pipe" / "transformer"):
        loaded = build_flux_model(FluxConfig(weights=str(path)))
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


def test_original_format_file_loads_into_same_weights_as_diffusers_twin(tiny):
    model, root = tiny
    loaded = build_flux_model(FluxConfig(weights=str(root / "flux-tiny.safetensors"), config=str(root / "pipe")))
    ref = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    torch.testing.assert_close(_forward(loaded), _forward(model.eval()))


def test_single_file_without_config_needs_flux1_head_dim(tiny):
    _, root = tiny
    with pytest.raises(ValueError, match="flux.config"):
        build_flux_model(FluxConfig(weights=str(root / "flux-tiny.safetensors")))


def test_infer_config_from_flux1_shaped_keys():
    """Shapes only (no real weights): a FLUX.1-dev-like header gives FLUX.1 sizes."""
    e = torch.empty
    state = {"img_in.weight": e(3072, 64), "txt_in.weight": e(3072, 4096), "vector_in.in_layer.weight": e(3072, 768),
             "guidance_in.in_layer.weight": e(3072, 256), "final_layer.linear.weight": e(64, 3072),
             "double_blocks.0.img_attn.norm.query_norm.scale": e(128), "double_blocks.18.img_mod.lin.weight": e(1),
             "single_blocks.37.linear1.weight": e(1)}
    cfg = infer_bfl_config(state)
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["num_attention_heads"]) == (19, 38, 24)
    assert cfg["guidance_embeds"] and cfg["out_channels"] is None and cfg["joint_attention_dim"] == 4096


def test_bad_paths_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="flux.weights"):
        build_flux_model(FluxConfig(weights=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="flux.weights is required"):
        build_flux_model(FluxConfig())
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        build_flux_model(FluxConfig(weights=str(bad)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_flux_model(FluxConfig(weights=str(tmp_path / "empty")))
