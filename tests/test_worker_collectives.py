"""The per-step host values (epoch end, non-finite loss, window sums) are reduced where the process group can."""
from __future__ import annotations

import pytest
import torch

from pipeline.train.collectives import collective_device


def test_gloo_reduces_on_the_cpu():
    assert collective_device("gloo") == torch.device("cpu")


def test_nccl_reduces_on_this_ranks_gpu(monkeypatch: pytest.MonkeyPatch):
    # NCCL has no CPU path: a CPU tensor fails with "No backend type associated with device type cpu"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device("nccl") == torch.device("cuda", 3)


def test_mixed_group_reduces_host_values_over_gloo(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert collective_device("cpu:gloo,cuda:nccl") == torch.device("cpu")
    assert collective_device("cuda:nccl") == torch.device("cuda", 1)
