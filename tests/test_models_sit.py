"""SiT backbone: paper sizes, official parameter names, conditioning, learn_sigma, gradient checkpointing."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models import build_model, build_sit, count_parameters
from pipeline.models.sit import sincos_2d, timestep_features

# DiT / SiT papers (Table: Gflops and parameters), 256 px -> 32x32x4 latents, 1000 classes, learn_sigma.
PAPER_PARAMS = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_parameter_counts_match_paper(size: str) -> None:
    with torch.device("meta"):
        model = build_sit(f"SiT-{size}/2", in_channels=4, input_size=32, num_classes=1000, learn_sigma=True)
    n = count_parameters(model)
    assert abs(n - PAPER_PARAMS[size]) / PAPER_PARAMS[size] < 0.01, (size, n)


def test_xl2_exact_count() -> None:
    """The released DiT-XL/2 / SiT-XL/2 have 675,129,632 parameters (pos_embed included)."""
    with torch.device("meta"):
        model = build_sit("SiT-XL/2", in_channels=4, input_size=32, num_classes=1000, learn_sigma=True)
    assert count_parameters(model) == 675_129_632


def tiny(**kw) -> torch.nn.Module:
    args = dict(in_channels=1, input_size=16, num_classes=10, hidden_size=32, depth=2, num_heads=4, patch_size=2)
    args.update(kw)
    return build_sit(None, **args)


def test_forward_shape_and_adaln_zero_start() -> None:
    torch.manual_seed(0)
    model = tiny(learn_sigma=True)
    assert model.out_channels == 2 and model.final_layer.linear.out_features == 2 * 2 * 2
    x, t, y = torch.randn(3, 1, 16, 16), torch.rand(3), torch.tensor([0, 5, 10])
    out = model(x, t, y)
    assert out.shape == (3, 1, 16, 16)  # the sigma half is dropped as in SiT
    assert torch.count_nonzero(out) == 0  # zero-initialised final layer


def test_official_parameter_names() -> None:
    keys = set(tiny(learn_sigma=True).state_dict())
    expected = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
                "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.bias", "blocks.1.mlp.fc1.weight",
                "blocks.1.mlp.fc2.bias", "blocks.1.adaLN_modulation.1.weight", "final_layer.linear.weight",
                "final_layer.adaLN_modulation.1.bias"}
    assert expected <= keys
    assert not any("norm" in k for k in keys)  # LayerNorms without affine parameters, as in DiT


def test_conditioning_changes_output_after_training_step() -> None:
    torch.manual_seed(0)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, y = torch.randn(8, 1, 16, 16), torch.rand(8), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(15):
        loss = (model(x, t, y) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    model.eval()
    a = model(x[:1], t[:1], torch.tensor([1]))
    b = model(x[:1], t[:1], torch.tensor([2]))
    c = model(x[:1], torch.tensor([0.9]), torch.tensor([1]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_label_dropout_uses_null_label_only_in_training() -> None:
    model = tiny(class_dropout_prob=1.0)
    y = torch.tensor([3, 4])
    null = model.y_embedder.embedding_table.weight[10]
    assert torch.allclose(model.y_embedder(y, train=True), null.expand(2, -1))
    assert torch.allclose(model.y_embedder(y, train=False), model.y_embedder.embedding_table.weight[[3, 4]])
    # unlabelled data (label -1) and y=None are unconditional
    assert torch.allclose(model.y_embedder(torch.tensor([-1]), train=False), null[None])
    model.eval()
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    assert torch.equal(model(x, t), model(x, t, torch.tensor([-1, 10])))


def test_gradient_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    a = tiny(class_dropout_prob=0.0)
    torch.nn.init.normal_(a.final_layer.linear.weight, std=0.1)  # leave the zero start so gradients flow deep
    for blk in a.blocks:
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
    b = tiny(class_dropout_prob=0.0, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([1, 2])
    a(x, t, y).square().sum().backward()
    b(x, t, y).square().sum().backward()
    ga = a.blocks[0].attn.qkv.weight.grad
    gb = b.blocks[0].attn.qkv.weight.grad
    assert ga.abs().sum() > 0 and torch.allclose(ga, gb, atol=1e-6)


def test_embeddings_formulas() -> None:
    pe = sincos_2d(8, 3)  # first half encodes the column index, second half the row index
    assert pe.shape == (9, 8)
    assert pe[1, 0] == pytest.approx(0.0 + torch.sin(torch.tensor(1.0)).item(), abs=1e-6)  # token (0,1), col=1
    assert pe[3, 4] == pytest.approx(torch.sin(torch.tensor(1.0)).item(), abs=1e-6)  # token (1,0), row=1
    f = timestep_features(torch.tensor([0.0, 1.0]), dim=4)
    assert torch.allclose(f[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert f[1, 0] == pytest.approx(torch.cos(torch.tensor(1.0)).item())


def test_build_model_dispatch_and_errors() -> None:
    named = build_model(ModelConfig(name="SiT-S/4", hidden_size=32), in_channels=4, input_size=16, num_classes=10)
    assert named.hidden_size == 384 and named.patch_size == 4 and len(named.blocks) == 12
    custom = build_model(ModelConfig(name="sit", hidden_size=32, depth=1, num_heads=2), in_channels=3,
                         input_size=8, num_classes=5)
    assert custom.hidden_size == 32 and len(custom.blocks) == 1
    with pytest.raises(ValueError, match="model.name=SiT-Q/2"):
        build_model(ModelConfig(name="SiT-Q/2"), in_channels=1, input_size=16, num_classes=10)
    with pytest.raises(ValueError, match="patch size 3"):
        build_model(ModelConfig(name="SiT-S/3"), in_channels=1, input_size=16, num_classes=10)
    with pytest.raises(ValueError, match="not divisible by model.patch_size"):
        build_model(ModelConfig(name="sit", patch_size=3), in_channels=1, input_size=16, num_classes=10)
