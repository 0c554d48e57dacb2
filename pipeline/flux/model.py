"""The FLUX transformer (diffusers ``FluxTransformer2DModel``) from local weights only (REFERENCE.md section 9).

Two on-disk forms are accepted, never a hub id:

- a diffusers folder: a pipeline root with ``model_index.json`` and a ``transformer/`` subfolder, or the
  ``transformer/`` folder itself (``config.json`` + safetensors);
- one original-format (Black Forest Labs) ``.safetensors`` file with keys ``double_blocks.N.img_attn.qkv`` etc.,
  loaded through ``FluxTransformer2DModel.from_single_file(state_dict, config=<local dir>, local_files_only=True)``.

diffusers 0.42's BFL converter hard-codes the FLUX.1 width (3072) when it splits each single block's fused
``linear1`` into q, k, v and the MLP input. We split those tensors ourselves by the checkpoint's own width and let
the converter map everything else, so the same code path loads a full-size file and a tiny test file.
The transformer config of a single file is read from ``flux.config`` (a local diffusers folder or ``config.json``)
or inferred from the tensor shapes (RoPE axes (16, 56, 56) when the head dim is 128, as in FLUX.1).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from pipeline.config import FluxConfig

BFL_PREFIX = "model.diffusion_model."
FLUX1_WIDTH = 3072  # the width diffusers' converter assumes for single-block linear1
FLUX1_AXES = (16, 56, 56)
MLP_RATIO = 4  # FluxSingleTransformerBlock / FluxTransformerBlock use a 4x MLP


def tiny_flux_config(guidance_embeds: bool = True) -> dict[str, Any]:
    """A 1 double + 1 single block, 2-head, head-dim-16 FLUX (16-channel latents packed 2x2 -> 64 channels)."""
    return dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1,
                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))


def flux1_config(guidance_embeds: bool = True) -> dict[str, Any]:
    """FLUX.1 [dev] (guidance_embeds=True) / [schnell] transformer sizes."""
    return dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=guidance_embeds, axes_dims_rope=FLUX1_AXES)


def build_flux_model(flux_cfg: FluxConfig | None, tiny: bool = False,
                     torch_dtype: torch.dtype | None = None, partitioned: bool = False) -> FluxTransformer2DModel:
    """The FLUX transformer named by ``flux_cfg.weights`` (a local path), or a random tiny one with ``tiny=True``.

    ``partitioned``: called inside ``deepspeed.zero.Init`` (ZeRO-3), see :func:`build_flux_partitioned`.
    """
    if partitioned:
        return build_flux_partitioned(flux_cfg, tiny=tiny)
    if tiny:
        guidance = True if flux_cfg is None else flux_cfg.guidance > 0
        model = FluxTransformer2DModel.from_config(tiny_flux_config(guidance_embeds=guidance))
        return model if torch_dtype is None else model.to(torch_dtype)
    if flux_cfg is None or not flux_cfg.weights:
        raise ValueError("flux.weights is required for model=flux "
                         "(a local diffusers folder or a BFL .safetensors file)")
    path = Path(flux_cfg.weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"flux.weights={flux_cfg.weights}: no such file or directory")
    if path.is_dir():
        return load_diffusers_transformer(path, torch_dtype)
    if path.suffix != ".safetensors":
        raise ValueError(f"flux.weights={flux_cfg.weights}: expected a diffusers folder or a .safetensors file")
    return load_bfl_checkpoint(path, config=flux_cfg.config, torch_dtype=torch_dtype)


def build_flux_partitioned(flux_cfg: FluxConfig | None, tiny: bool = False) -> FluxTransformer2DModel:
    """Inside ``deepspeed.zero.Init``: the architecture from its config (every layer partitioned as it is made),
    then a diffusers folder's tensors streamed in one at a time, each rank keeping only its own slice, so no rank
    holds more than one full tensor. An original-format single file is refused: its conversion needs the whole
    state dict in memory."""
    if tiny:
        guidance = True if flux_cfg is None else flux_cfg.guidance > 0
        return FluxTransformer2DModel.from_config(tiny_flux_config(guidance_embeds=guidance))
    if flux_cfg is None or not flux_cfg.weights:
        raise ValueError("flux.weights is required for model=flux "
                         "(a local diffusers folder or a BFL .safetensors file)")
    path = Path(flux_cfg.weights).expanduser()
    if not path.is_dir():
        raise ValueError(f"flux.weights={flux_cfg.weights}: train.zero_stage=3 builds FLUX partitioned "
                         "(deepspeed.zero.Init) and loads only a diffusers folder into it; convert the single file "
                         "once (FluxTransformer2DModel.from_single_file(...).save_pretrained(DIR)) and pass DIR")
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    model = FluxTransformer2DModel.from_config(read_config(str(folder)))
    load_into_partitioned(model, folder, flux_cfg.weights)
    return model


@torch.no_grad()
def load_into_partitioned(model: torch.nn.Module, folder: Path, name: str) -> None:
    """Copy the ``*.safetensors`` tensors of ``folder`` into a ZeRO-3 partitioned ``model``, one tensor at a time:
    each rank reads the tensor and writes only its own flat slice into its partition (``ds_tensor``)."""
    from safetensors import safe_open

    from pipeline.models.zero_init import own_slice

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"flux.weights={name}: no .safetensors weights in {folder}")
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key in buffers:
                    buffers[key].copy_(reader.get_tensor(key))
                elif key in params:
                    p = params[key]
                    tensor = reader.get_tensor(key)
                    shape = tuple(p.ds_shape) if hasattr(p, "ds_id") else tuple(p.shape)
                    if tuple(tensor.shape) != shape:
                        raise ValueError(f"flux.weights={name}: tensor {key} has shape {tuple(tensor.shape)}, "
                                         f"the model {shape}")
                    if hasattr(p, "ds_id"):
                        start, _, valid = own_slice(p)
                        p.ds_tensor[:valid].copy_(tensor.reshape(-1)[start:start + valid])
                    else:
                        p.copy_(tensor)
                else:
                    raise ValueError(f"flux.weights={name}: tensor {key} is not in the FLUX transformer")
                loaded.add(key)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"flux.weights={name}: no tensor for {missing[0]} ({len(missing)} missing)")


def load_diffusers_transformer(path: Path, torch_dtype: torch.dtype | None = None) -> FluxTransformer2DModel:
    """A diffusers pipeline root (``transformer/`` subfolder) or a transformer folder, offline."""
    subfolder = None
    if (path / "model_index.json").is_file() or (path / "transformer" / "config.json").is_file():
        subfolder = "transformer"
    folder = path / subfolder if subfolder else path
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"flux.weights={path}: no transformer config.json (expected {folder / 'config.json'})")
    return FluxTransformer2DModel.from_pretrained(str(path), subfolder=subfolder, local_files_only=True,
                                                  torch_dtype=torch_dtype)


def load_bfl_checkpoint(path: Path, config: str | None = None,
                        torch_dtype: torch.dtype | None = None) -> FluxTransformer2DModel:
    """An original-format FLUX ``.safetensors`` file -> ``FluxTransformer2DModel`` (no network)."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated/invalid files
        raise ValueError(f"flux.weights={path}: not a readable safetensors file ({exc})") from None
    state = {k.removeprefix(BFL_PREFIX): v for k, v in state.items()}
    if "img_in.weight" not in state or not any(k.startswith("double_blocks.") for k in state):
        raise ValueError(f"flux.weights={path}: not an original-format FLUX transformer "
                         "(no img_in / double_blocks keys)")
    if config:
        model_config = read_config(config)
        check_config_fits(model_config, state, config, path)
    else:
        model_config = infer_bfl_config(state, path)
    converted = convert_bfl_state_dict(state, model_config)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **model_config}))
        return FluxTransformer2DModel.from_single_file(converted, config=tmp, local_files_only=True,
                                                       torch_dtype=torch_dtype)


def read_config(config: str) -> dict[str, Any]:
    """A transformer config from a local ``config.json``, transformer folder or pipeline root."""
    path = Path(config).expanduser()
    for candidate in (path, path / "config.json", path / "transformer" / "config.json"):
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            return {k: v for k, v in data.items() if not k.startswith("_")}
    raise FileNotFoundError(f"flux.config={config}: no transformer config.json there")


def bfl_sizes(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The transformer sizes an original-format state dict's tensor shapes fix (everything but the RoPE axes)."""
    width, in_channels = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    out_channels = state["final_layer.linear.weight"].shape[0]
    return dict(in_channels=int(in_channels), out_channels=None if out_channels == in_channels else int(out_channels),
                num_layers=_count_blocks(state, "double_blocks."),
                num_single_layers=_count_blocks(state, "single_blocks."),
                attention_head_dim=int(head_dim), num_attention_heads=int(width // head_dim),
                joint_attention_dim=int(state["txt_in.weight"].shape[1]),
                pooled_projection_dim=int(state["vector_in.in_layer.weight"].shape[1]),
                guidance_embeds="guidance_in.in_layer.weight" in state)


def infer_bfl_config(state: dict[str, torch.Tensor], path: Path | str = "<state dict>") -> dict[str, Any]:
    """Transformer sizes read off an original-format state dict (RoPE axes need head dim 128, as in FLUX.1)."""
    sizes = bfl_sizes(state)
    if sizes["attention_head_dim"] != 128:
        raise ValueError(f"flux.weights={path}: head dim {sizes['attention_head_dim']} is not FLUX.1's 128, so the "
                         "RoPE axes cannot be inferred; pass flux.config=<local diffusers folder or config.json>")
    return dict(patch_size=1, **sizes, axes_dims_rope=FLUX1_AXES)


def check_config_fits(model_config: dict[str, Any], state: dict[str, torch.Tensor], config: str,
                      path: Path | str) -> None:
    """Refuse, in one line naming ``flux.config``, a transformer config whose sizes the checkpoint's tensors
    contradict (diffusers would fail deep inside its converter, or load a model the file does not describe)."""
    given = dict(model_config)
    if given.get("out_channels") == given.get("in_channels"):
        given["out_channels"] = None
    sizes = bfl_sizes(state)
    for key, value in sizes.items():
        if key in given and given[key] != value:
            raise ValueError(f"flux.config={config}: {key}={given[key]} does not fit flux.weights={path} "
                             f"(its tensors give {key}={value})")
    axes = given.get("axes_dims_rope")
    if axes is not None and sum(axes) != sizes["attention_head_dim"]:
        raise ValueError(f"flux.config={config}: axes_dims_rope={list(axes)} does not sum to the head dim "
                         f"{sizes['attention_head_dim']} of flux.weights={path}")


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    return 1 + max((int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)), default=-1)


def convert_bfl_state_dict(state: dict[str, torch.Tensor], model_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """BFL key names -> diffusers key names, for any width (consumes ``state``).

    Single blocks fuse ``linear1 = [q; k; v; mlp_in]`` with sizes (w, w, w, 4w). diffusers' converter assumes
    w = 3072, so we split them here by the real width, hand the converter same-named placeholders of the size it
    expects, and then put the real tensors in place of what it produced from the placeholders.
    """
    width = model_config["num_attention_heads"] * model_config["attention_head_dim"]
    expected = (3 + MLP_RATIO) * FLUX1_WIDTH
    split: dict[str, torch.Tensor] = {}
    n_single = _count_blocks(state, "single_blocks.")
    for i in range(n_single):
        for kind in ("weight", "bias"):
            fused = state[f"single_blocks.{i}.linear1.{kind}"]
            if fused.shape[0] != (3 + MLP_RATIO) * width:
                raise ValueError(f"single_blocks.{i}.linear1.{kind} has {fused.shape[0]} rows, expected "
                                 f"{(3 + MLP_RATIO) * width} for width {width}")
            if width == FLUX1_WIDTH:
                continue
            q, k, v, mlp = torch.split(fused, (width, width, width, MLP_RATIO * width), dim=0)
            prefix = f"single_transformer_blocks.{i}."
            split.update({f"{prefix}attn.to_q.{kind}": q, f"{prefix}attn.to_k.{kind}": k,
                          f"{prefix}attn.to_v.{kind}": v, f"{prefix}proj_mlp.{kind}": mlp})
            state[f"single_blocks.{i}.linear1.{kind}"] = torch.empty(expected, dtype=fused.dtype)
    converted = convert_flux_transformer_checkpoint_to_diffusers(state)
    if state:
        raise ValueError(f"unexpected keys in the FLUX checkpoint: {sorted(state)[:5]}")
    converted.update(split)
    return converted


def prepare_for_training(model: FluxTransformer2DModel, flux_cfg: FluxConfig) -> FluxTransformer2DModel:
    """LoRA (frozen base) or full fine-tune set-up; see :func:`pipeline.flux.lora.prepare_for_training`.

    Trained parameters are fp32 (the optimizer's master weights) whatever dtype the base was loaded in; frozen
    ones keep theirs (a bf16 base stays bf16: half the memory of an fp32 copy, and autocast computes in bf16 anyway).
    """
    from pipeline.flux.lora import prepare_for_training as prepare

    model = prepare(model, flux_cfg)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def frozen_dtype(flux_cfg: FluxConfig, precision: str) -> torch.dtype | None:
    """The dtype to load the FLUX base in: the training dtype for a LoRA run under bf16 (the base is frozen and
    only read under autocast), else None (as stored; a full fine-tune trains every weight in fp32)."""
    return torch.bfloat16 if flux_cfg.mode == "lora" and precision == "bf16" else None


def save_finetuned(model: torch.nn.Module, flux_cfg: FluxConfig, out_dir: str | Path) -> Path:
    """LoRA file or diffusers folder (every rank calls it under ZeRO-3); see ``pipeline.flux.lora.save_finetuned``."""
    from pipeline.flux.lora import save_finetuned as save

    return save(model, flux_cfg, out_dir)
