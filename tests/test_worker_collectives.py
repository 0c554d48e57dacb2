"""The per-step host values (epoch end, non-finite loss, window sums) are reduced where the process group can."""
from __future__ import annotations

import pytest
import torch

from pipeline.train.collectives import collective_device
from spawn_ranks import run_ranks


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


def _rank_main(rank: int, init_file: str) -> dict:
    import torch.distributed as dist

    from pipeline.train.collectives import all_reduce_min, all_reduce_sum, step_flags

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        nan_on_rank0 = torch.tensor(float("nan") if rank == 0 else 1.5)
        return {
            "clean": step_flags(torch.tensor(0.25), ran_out=False),
            "one_nan_one_ended": step_flags(nan_on_rank0, ran_out=rank == 1),
            "sums": all_reduce_sum([rank + 1.0, 10.0]),
            "auto_batch": all_reduce_min([96.0 if rank == 0 else 80.0]),  # data.batch_size=auto: smallest GPU wins
        }
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree_on_a_nan_and_an_epoch_end_seen_by_one(tmp_path):
    results = run_ranks(_rank_main, (str(tmp_path / "init"),), nprocs=2, out_dir=tmp_path / "out", timeout_s=120)
    for rank in (0, 1):  # every rank skips together and ends the epoch together
        assert results[rank]["clean"] == (False, False)
        assert results[rank]["one_nan_one_ended"] == (True, True)
        assert results[rank]["sums"] == [3.0, 20.0]
        assert results[rank]["auto_batch"] == [80.0]


def test_single_process_flags_need_no_process_group():
    from pipeline.train.collectives import all_reduce_sum, step_flags

    assert step_flags(torch.tensor(float("inf")), ran_out=False) == (True, False)
    assert step_flags(torch.tensor(1.0), ran_out=True) == (False, True)
    assert all_reduce_sum([1.0, 2.0]) == [1.0, 2.0]
