"""Official SiT/DiT checkpoint import: key layout, EMA choice, learn_sigma / num_classes handling, safe loading."""
from __future__ import annotations

import argparse
import fractions
from pathlib import Path

import pytest
import torch

from pipeline.models import build_sit
from pipeline.models.checkpoint_import import (CheckpointMismatchError, export_safetensors, infer_sit_config,
                                               load_official_checkpoint, read_state_dict)


def official_sit_layout(depth: int = 12, hidden: int = 384, patch: int = 2, in_ch: int = 4, grid: int = 16,
                        num_classes: int = 1000, out_ch: int = 8) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the released SiT/DiT models (SiT-S/2 at 256 px by default), written out."""
    spec: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, grid * grid, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        spec.update({
            b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
            b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    return spec


def random_state(spec: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.02 for k, shape in spec.items()}


def test_official_sit_s2_training_checkpoint_loads_with_no_missing_keys(tmp_path: Path) -> None:
    ema = random_state(official_sit_layout())
    args = argparse.Namespace(model="SiT-S/2", image_size=256, num_classes=1000, path_type="Linear")
    path = tmp_path / "0400000.pt"
    torch.save({"model": ema, "ema": ema, "opt": {}, "args": args}, path)  # shared storage: saved once
    model = build_sit("SiT-S/2", in_channels=4, input_size=32, num_classes=1000, learn_sigma=True)
    report = load_official_checkpoint(path, model)
    assert report.source == "ema" and report.loaded == len(ema) == len(model.state_dict())
    assert report.notes == [] and report.args["model"] == "SiT-S/2"
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[key]), key
    assert infer_sit_config(ema) == {"hidden_size": 384, "depth": 12, "patch_size": 2, "in_channels": 4,
                                     "input_size": 32, "num_classes": 1000, "learn_sigma": True}


def small_layout(**kw) -> dict[str, tuple[int, ...]]:
    args = dict(depth=2, hidden=32, patch=2, in_ch=4, grid=4, num_classes=10, out_ch=8)
    args.update(kw)
    return official_sit_layout(**args)


def small_model(**kw) -> torch.nn.Module:
    args = dict(in_channels=4, input_size=8, num_classes=10, hidden_size=32, depth=2, num_heads=4, patch_size=2,
                learn_sigma=True)
    args.update(kw)
    return build_sit(None, **args)


def test_ema_is_default_and_model_weights_on_request(tmp_path: Path) -> None:
    spec = small_layout()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": random_state(spec, 1), "ema": random_state(spec, 2), "opt": {}}, path)
    ema, _ = read_state_dict(path)
    raw, report = read_state_dict(path, use_ema=False)
    assert report.source == "model" and not torch.equal(ema["pos_embed"], raw["pos_embed"])
    model = small_model()
    assert load_official_checkpoint(path, model).source == "ema"
    assert torch.equal(model.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])


def test_bare_state_dict_with_ddp_prefix(tmp_path: Path) -> None:
    state = {f"module.{k}": v for k, v in random_state(small_layout()).items()}
    torch.save(state, tmp_path / "bare.pt")
    report = load_official_checkpoint(tmp_path / "bare.pt", small_model())
    assert report.source == "bare" and report.loaded == len(state)


def test_learn_sigma_mismatch_keeps_the_transport_half(tmp_path: Path) -> None:
    state = random_state(small_layout(), seed=3)
    torch.save(state, tmp_path / "sigma.pt")
    with_sigma, without = small_model(learn_sigma=True), small_model(learn_sigma=False)
    load_official_checkpoint(tmp_path / "sigma.pt", with_sigma)
    report = load_official_checkpoint(tmp_path / "sigma.pt", without)
    assert any("sigma half" in n and "dropped" in n for n in report.notes)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with_sigma.eval(), without.eval()
    assert torch.allclose(with_sigma(x, t, y), without(x, t, y), atol=1e-6)
    assert with_sigma(x, t, y).abs().sum() > 0
    # the other direction: the missing sigma half is zero-filled
    torch.save(without.state_dict(), tmp_path / "nosigma.pt")
    again = small_model(learn_sigma=True).eval()
    notes = load_official_checkpoint(tmp_path / "nosigma.pt", again).notes
    assert any("zero-filled" in n for n in notes)
    assert torch.allclose(again(x, t, y), without(x, t, y), atol=1e-6)


def test_num_classes_mismatch_is_refused_or_reinitialised(tmp_path: Path) -> None:
    state = random_state(small_layout(num_classes=1000))
    torch.save(state, tmp_path / "imagenet.pt")
    with pytest.raises(CheckpointMismatchError, match=r"num_classes mismatch, checkpoint has 1000 classes.*model 10"):
        load_official_checkpoint(tmp_path / "imagenet.pt", small_model())
    model = small_model()
    report = load_official_checkpoint(tmp_path / "imagenet.pt", model, new_classes="reinit")
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(table[10], state["y_embedder.embedding_table.weight"][1000])  # null label kept
    assert any("num_classes" in n for n in report.notes)


def test_mismatched_architecture_message_names_every_problem(tmp_path: Path) -> None:
    state = random_state(small_layout(depth=3, hidden=32))
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3 * 32, 16)
    del state["t_embedder.mlp.2.bias"]
    torch.save({"ema": state}, tmp_path / "deep.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_checkpoint(tmp_path / "deep.pt", small_model())
    msg = str(err.value)
    assert "\n" not in msg
    assert "unexpected keys (10): blocks.2." in msg
    assert "missing keys (1): t_embedder.mlp.2.bias" in msg
    assert "blocks.0.attn.qkv.weight (96, 16) vs model (96, 32)" in msg


def test_other_resolution_keeps_fixed_position_table(tmp_path: Path) -> None:
    torch.save(random_state(small_layout(grid=8)), tmp_path / "big.pt")
    model = small_model()
    before = model.pos_embed.clone()
    notes = load_official_checkpoint(tmp_path / "big.pt", model).notes
    assert torch.equal(model.pos_embed, before) and any("pos_embed" in n for n in notes)


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    extra = fractions.Fraction(1, 3)  # any object outside the weights-only allow-list
    torch.save({"ema": random_state(small_layout()), "extra": extra}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot be loaded weights-only"):
        load_official_checkpoint(tmp_path / "evil.pt", small_model())
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_official_checkpoint(tmp_path / "nope.pt", small_model())


def test_safetensors_export_round_trip(tmp_path: Path) -> None:
    src = small_model()
    torch.nn.init.normal_(src.final_layer.linear.weight)
    path = export_safetensors(src, tmp_path / "w.safetensors", metadata={"model": "sit"})
    dst = small_model()
    report = load_official_checkpoint(path, dst)
    assert report.loaded == len(src.state_dict())
    for key, value in src.state_dict().items():
        assert torch.equal(value, dst.state_dict()[key])
