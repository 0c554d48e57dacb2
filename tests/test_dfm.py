"""Decomposable Flow Matching: pyramid, model, SiT -> DFM, loss masking, stage-wise sampler, training."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig, TrainJobConfig
from pipeline.models import build_model, build_sit
from pipeline.models.checkpoint_import import export_safetensors, load_official_checkpoint
from pipeline.models.dfm import DFM, dfm_from_sit, stage_patch_sizes
from pipeline.objective import build_objective
from pipeline.transport.multiscale import (DFMObjective, decompose, default_stage_steps, phase_end_times,
                                           reconstruct)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_pyramid_round_trip(stages: int) -> None:
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    parts = decompose(x, stages)
    assert [p.shape[-1] for p in parts] == [16 // 2 ** (stages - 1 - s) for s in range(stages)]
    assert torch.allclose(reconstruct(parts), x, atol=1e-12)
    if stages > 1:
        assert torch.allclose(parts[0], F.avg_pool2d(x, 2 ** (stages - 1)), atol=1e-12)  # bilinear x1/2 = 2x2 mean
        assert parts[-1].abs().mean() < x.abs().mean()  # the detail band of white noise is smaller than the image
    with pytest.raises(ValueError, match="cannot be halved"):
        decompose(torch.randn(1, 1, 6, 6), 3)


def tiny_dfm(**kw) -> DFM:
    args = dict(stages=2, input_size=16, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4,
                num_classes=10, learn_sigma=False)
    args.update(kw)
    return DFM(**args)


def test_dfm_model_equal_tokens_and_zero_start() -> None:
    assert stage_patch_sizes(4, 3) == [1, 2, 4]
    with pytest.raises(ValueError, match="model.patch_size=2 cannot give equal token counts for model.dfm_stages=3"):
        stage_patch_sizes(2, 3)
    model = tiny_dfm()
    xs = [torch.randn(3, 1, 8, 8), torch.randn(3, 1, 16, 16)]
    assert [e(x).shape for e, x in zip([model.stage_x_embedders[0], model.x_embedder], xs)] == [(3, 64, 32)] * 2
    outs = model(xs, torch.rand(3, 2), torch.tensor([1, 2, 10]))
    assert [o.shape for o in outs] == [(3, 1, 8, 8), (3, 1, 16, 16)]
    assert all(torch.count_nonzero(o) == 0 for o in outs)
    sit = build_sit(None, in_channels=1, input_size=16, num_classes=10, hidden_size=32, depth=2, num_heads=4)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in sit.parameters())
    assert extra > 0 and all(k.startswith(("stage_",)) for k in set(model.state_dict()) - set(sit.state_dict()))


def test_dfm_from_sit_reproduces_the_sit_on_the_finest_stage() -> None:
    torch.manual_seed(0)
    sit = build_sit(None, in_channels=1, input_size=16, num_classes=10, hidden_size=32, depth=2, num_heads=4).eval()
    nn.init.normal_(sit.final_layer.linear.weight, std=0.1)
    nn.init.normal_(sit.final_layer.adaLN_modulation[1].weight, std=0.1)
    dfm = dfm_from_sit(sit, stages=2).eval()
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([3, 4])
    coarse = torch.randn(2, 1, 8, 8)
    outs = dfm([coarse, x], torch.stack([torch.rand(2), t], dim=1), y)
    assert torch.allclose(outs[1], sit(x, t, y), atol=1e-5)
    assert torch.count_nonzero(outs[0]) == 0
    assert dfm.blocks[0].attn.qkv.weight.data_ptr() != sit.blocks[0].attn.qkv.weight.data_ptr()  # copied


def test_official_sit_checkpoint_initialises_a_dfm(tmp_path: Path) -> None:
    sit = build_sit(None, in_channels=1, input_size=16, num_classes=10, hidden_size=32, depth=2, num_heads=4)
    nn.init.normal_(sit.final_layer.linear.weight)
    path = export_safetensors(sit, tmp_path / "sit.safetensors")
    dfm = tiny_dfm()
    report = load_official_checkpoint(path, dfm)
    assert any("new layers" in n for n in report.notes)
    assert torch.equal(dfm.final_layer.linear.weight, sit.final_layer.linear.weight)
    assert torch.count_nonzero(dfm.stage_x_embedders[0].proj.weight) == 0  # zeroed: the DFM starts as the SiT


class PointOracle(nn.Module):
    """Exact velocity of the linear path towards one fixed image, per stage: v_s = (x*_s - x_s) / (1 - t_s)."""

    def __init__(self, target: torch.Tensor, stages: int):
        super().__init__()
        self.register_buffer("dummy", torch.zeros(()))
        self.dummy_param = nn.Parameter(torch.zeros(()))
        self.parts = decompose(target, stages)
        self.calls: list[torch.Tensor] = []
        self.batch_sizes: list[int] = []

    def forward(self, xs, t, y=None):
        self.calls.append(t.clone())
        self.batch_sizes.append(xs[0].shape[0])
        return [(p.expand_as(x) - x) / (1 - t[:, s]).clamp_min(1e-6).reshape(-1, 1, 1, 1)
                for s, (p, x) in enumerate(zip(self.parts, xs))]


@pytest.mark.parametrize("stages,steps", [(2, [3, 2]), (3, [2, 2, 2])])
def test_stage_wise_sampler_reaches_the_data_and_counts_nfe(stages: int, steps: list[int]) -> None:
    target = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    oracle = PointOracle(target, stages).double()
    obj = DFMObjective(stages=stages, stage_probs=[1 / stages] * stages, stage_steps=steps, threshold=0.7)
    out = obj.sample(oracle, {}, (2, 2, 16, 16), torch.Generator().manual_seed(0))
    assert out.nfe == sum(steps) == len(oracle.calls)
    assert torch.allclose(out.x, target.expand(2, -1, -1, -1), atol=1e-8)  # Euler is exact on straight paths
    first = oracle.calls[0][0].tolist()
    assert first == [0.0] * stages  # stage 0 starts alone; later stages wait at t = 0
    start_of_phase_1 = oracle.calls[steps[0]][0].tolist()
    assert start_of_phase_1[:2] == pytest.approx([0.7, 0.0])


def test_guidance_runs_conditional_and_null_labels_in_one_call() -> None:
    from pipeline.config import GuidanceConfig

    target = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    oracle = PointOracle(target, 2).double()
    obj = DFMObjective(stages=2, stage_steps=[3, 1], guidance=GuidanceConfig(scale=3.0, t_min=0.0, t_max=0.5),
                       num_classes=10)
    out = obj.sample(oracle, {"label": torch.tensor([1, 2])}, (2, 1, 8, 8))
    assert out.nfe == 4 and torch.allclose(out.x, target.expand(2, -1, -1, -1), atol=1e-8)
    assert oracle.batch_sizes == [4, 4, 2, 4]  # guided while the newest stage's time (0, .3, .6 | 0) is in [0, .5]


def test_parameter_overhead_matches_paper() -> None:
    """DFM adds about 0.6% parameters to DiT-XL/2 (REFERENCE.md section 6)."""
    with torch.device("meta"):
        sit = build_sit("SiT-XL/2", in_channels=4, input_size=32, num_classes=1000, learn_sigma=True)
        dfm = DFM(stages=2, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                  num_classes=1000, learn_sigma=True)
    n_sit = sum(p.numel() for p in sit.parameters())
    n_dfm = sum(p.numel() for p in dfm.parameters())
    assert 0.005 < (n_dfm - n_sit) / n_sit < 0.007


def test_phase_schedule() -> None:
    assert phase_end_times(2, 0.9) == [[0.9, 0.0], [1.0, 1.0]]
    ends = phase_end_times(3, 0.5)
    assert ends[1] == pytest.approx([0.75, 0.5, 0.0]) and ends[2] == [1.0, 1.0, 1.0]
    assert default_stage_steps(40, 2) == [30, 10] and sum(default_stage_steps(32, 3)) == 32


def test_stage_sampling_and_loss_masking() -> None:
    obj = DFMObjective(stages=2, stage_probs=[0.9, 0.1], stage_steps=[3, 1])
    q, t = obj.sample_times(20000, generator=torch.Generator().manual_seed(0))
    assert abs((q == 0).float().mean().item() - 0.9) < 0.01
    assert torch.all(t[q == 0, 1] == 0)  # later stage: pure noise
    assert 0.75 < t[q == 1, 0].mean().item() < 0.85  # earlier stage nearly clean: E sigmoid(N(1.5, 1)) ~ 0.79
    assert abs(t[q == 1, 1].mean().item() - 0.5) < 0.02

    torch.manual_seed(0)
    model = tiny_dfm()
    coarse_only = DFMObjective(stages=2, stage_probs=[1.0, 0.0], stage_steps=[1, 1])
    batch = {"image": torch.randn(4, 1, 16, 16), "label": torch.tensor([0, 1, 2, 3])}
    coarse_only.loss(model, batch).backward()
    assert model.final_layer.linear.weight.grad.abs().sum() == 0  # the fine stage's loss is masked
    assert model.stage_final_layers[0].linear.weight.grad.abs().sum() > 0


@pytest.fixture
def one_thread():
    """The test machine is shared: one intra-op thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blob_batch(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Two classes of 8x8 images: a bright 3x3 square top-left or bottom-right, plus a little noise."""
    label = torch.randint(0, 2, (n,), generator=generator)
    img = torch.full((n, 1, 8, 8), -1.0)
    img[label == 0, :, 1:4, 1:4] = 1.0
    img[label == 1, :, 4:7, 4:7] = 1.0
    return {"image": img + 0.05 * torch.randn(img.shape, generator=generator), "label": label}


def test_dfm_trains_and_samples_class_conditionally(one_thread) -> None:
    torch.manual_seed(0)
    cfg = TrainJobConfig(model=ModelConfig(name="dfm", hidden_size=48, depth=2, num_heads=4, dfm_stage_steps=[12, 4]))
    model = build_model(cfg.model, in_channels=1, input_size=8, num_classes=2)
    assert isinstance(model, DFM)
    obj = build_objective(cfg, num_classes=2)
    assert isinstance(obj, DFMObjective) and obj.stage_probs == [0.9, 0.1]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(120):
        loss = obj.loss(model, blob_batch(32, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:10]) / 10
    model.eval()
    out = obj.sample(model, {"label": torch.tensor([0, 0, 1, 1])}, (4, 1, 8, 8), torch.Generator().manual_seed(2))
    assert out.nfe == 16 and out.x.shape == (4, 1, 8, 8)
    top_left, bottom_right = out.x[:, 0, 1:4, 1:4].mean((1, 2)), out.x[:, 0, 4:7, 4:7].mean((1, 2))
    assert torch.all(top_left[:2] > bottom_right[:2]) and torch.all(bottom_right[2:] > top_left[2:])


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match="dfm_stage_probs has 3 entries"):
        build_objective(TrainJobConfig(model=ModelConfig(name="dfm", dfm_stage_probs=[0.5, 0.3, 0.2])), 10)
    with pytest.raises(ValueError, match="dfm_stage_steps"):
        build_objective(TrainJobConfig(model=ModelConfig(name="dfm", dfm_stage_steps=[10])), 10)
    with pytest.raises(ValueError, match="model.patch_size=2 cannot give equal token counts"):
        build_model(ModelConfig(name="dfm", dfm_stages=3), in_channels=1, input_size=16, num_classes=10)
