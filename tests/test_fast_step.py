"""Settings of a fast training step (issue 23): data.batch_size=auto, fused AdamW on the GPU, SDPA attention, and
metric reports to Ray Train that never stall the loop. CPU only: the GPU side is checked by benchmarks/gpu."""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, TrainConfig, TrainJobConfig, load_config
from pipeline.train.batch_probe import largest_fitting, step_fits, with_headroom


@pytest.mark.parametrize("capacity", [1, 2, 3, 37, 64, 100, 1000])
def test_probe_finds_the_largest_batch_that_fits_in_few_trials(capacity):
    tried: list[int] = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= capacity

    assert largest_fitting(fits) == capacity
    assert len(tried) <= 2 * math.ceil(math.log2(capacity + 1)) + 2  # doubling, then bisection
    assert max(tried) <= 2 * capacity  # never tries far past the first failure


def test_probe_edges_none_fits_and_the_limit():
    assert largest_fitting(lambda b: False) == 0
    assert largest_fitting(lambda b: True, limit=300) == 300
    assert largest_fitting(lambda b: b <= 50, start=8) == 50


def test_headroom_keeps_ninety_percent_in_multiples_of_8():
    assert [with_headroom(b) for b in (1, 5, 9, 37, 64, 1000)] == [1, 4, 8, 32, 56, 896]


class MemoryBudgetSiT(torch.nn.Module):
    """A real tiny SiT whose forward fails like the CUDA allocator once the batch exceeds a memory budget."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        from pipeline.config import ModelConfig
        from pipeline.models import build_model

        self.budget = budget
        self.net = build_model(ModelConfig(hidden_size=16, depth=1, num_heads=2), in_channels=1, input_size=8,
                               num_classes=10)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] > self.budget:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x, t, y)


def _sample(batch: int) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(batch, 1, 8, 8), "label": torch.randint(0, 10, (batch,))}


def test_real_training_steps_probe_to_the_budget_and_other_errors_surface():
    from contextlib import nullcontext

    from pipeline.objective import build_objective

    objective = build_objective(TrainJobConfig(), 10)
    fits = step_fits(lambda: MemoryBudgetSiT(budget=12), objective, _sample, torch.device("cpu"), nullcontext())
    assert largest_fitting(fits) == 12
    wrong_shape = step_fits(lambda: MemoryBudgetSiT(budget=12), objective,
                            lambda b: {"image": torch.randn(b, 3, 8, 8), "label": torch.zeros(b, dtype=torch.long)},
                            torch.device("cpu"), nullcontext())
    with pytest.raises(RuntimeError) as err:  # not an out-of-memory: a bug, raised, not read as "does not fit"
        wrong_shape(2)
    assert "out of memory" not in str(err.value)


@pytest.mark.parametrize("overrides,named", [
    (["data.batch_size=auto"], "data.batch_size=auto probes the accelerator's memory and needs train.use_gpu=true"),
    (["data.batch_size=auto", "train.use_gpu=true", "model=flux"], "model.name=flux needs a number"),
    (["data.batch_size=0"], "data.batch_size=0: must be a whole number >= 1, or auto"),
    (["data.batch_size=many"], "data.batch_size=many"),
])
def test_auto_batch_is_refused_in_one_line_where_it_has_no_meaning(overrides, named):
    with pytest.raises(ConfigError) as err:
        load_config(TrainJobConfig, "train", overrides)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_auto_batch_on_the_gpu_is_accepted_and_privacy_refuses_it():
    from privacy.config import PrivacyTrainConfig

    assert load_config(TrainJobConfig, "train", ["data.batch_size=auto", "train.use_gpu=true"]).data.batch_size == "auto"
    with pytest.raises(ConfigError, match="data.batch_size=auto is not available for privacy training"):
        load_config(PrivacyTrainConfig, None, ["data.batch_size=auto", "train.use_gpu=true"])


def test_adamw_is_fused_exactly_where_its_state_is_on_the_gpu(monkeypatch):
    from pipeline.train.engine import fused_adamw

    assert not fused_adamw(TrainConfig(use_gpu=False))  # CPU run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fused_adamw(TrainConfig(use_gpu=True))
    assert not fused_adamw(TrainConfig(use_gpu=True, zero_stage=3, offload=True))  # the state lives on the host


def test_sit_attention_is_scaled_dot_product_attention(monkeypatch):
    """SiT's attention (F.scaled_dot_product_attention, which picks flash / memory-efficient kernels on a GPU) equals
    softmax(q k^T / sqrt(d)) v over the heads."""
    from pipeline.models.sit import Attention

    torch.manual_seed(0)
    attn, x = Attention(16, 4), torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)
    calls, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    attn(x)
    assert calls == [1]  # one fused kernel call, not a hand-written softmax


def test_reporter_never_waits_for_a_slow_controller_and_keeps_order(monkeypatch):
    """Ray Train's report blocks until its controller polls (here: a report takes 0.3 s). The loop's thread only
    hands it over; while one is in flight the reporter says it is busy (so every rank skips that window); a
    checkpoint report drains it first, so reports keep their order."""
    import ray.train

    from pipeline.train.reporting import MetricReporter

    done: list[int] = []
    gate = threading.Event()

    def slow_report(metrics: dict) -> None:
        gate.wait(5)
        done.append(metrics["step"])

    monkeypatch.setattr(ray.train, "report", slow_report)
    reporter = MetricReporter()
    assert reporter.idle()
    t = time.perf_counter()
    reporter.submit({"step": 20})
    assert time.perf_counter() - t < 0.1 and not reporter.idle()  # handed over, not waited for
    gate.set()
    reporter.drain()
    assert done == [20] and reporter.idle()

    def failing_report(metrics: dict) -> None:
        raise RuntimeError("controller gone")

    monkeypatch.setattr(ray.train, "report", failing_report)
    reporter.submit({"step": 40})
    time.sleep(0.2)
    with pytest.raises(RuntimeError, match="controller gone"):  # a failed report surfaces at the next window
        reporter.idle()
    reporter.close()
