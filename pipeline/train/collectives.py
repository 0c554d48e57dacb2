"""The few host values training ranks agree on each step (epoch end, a NaN/Inf loss, window sums)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device(backend: str) -> torch.device:
    """Where a host value must sit to be all-reduced: NCCL reduces CUDA tensors only, gloo CPU tensors.

    A mixed group (``"cpu:gloo,cuda:nccl"``) reduces CPU tensors over gloo.
    """
    kinds = dict(item.split(":", 1) for item in backend.split(",")) if ":" in backend else {"": backend}
    if "cpu" not in kinds and "nccl" in kinds.values():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Each value summed over all ranks (unchanged without a process group)."""
    if not _distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(str(dist.get_backend())))
    dist.all_reduce(t)
    return t.tolist()


def step_flags(loss: torch.Tensor, ran_out: bool) -> tuple[bool, bool]:
    """(some rank's loss is NaN/Inf, some rank's stream has ended): one all-reduce, the step's one host sync."""
    if not _distributed():  # one rank: the loss value itself is the host sync
        return not math.isfinite(loss.detach().item()), ran_out
    bad = (~torch.isfinite(loss.detach())).to(torch.float64).reshape(1)
    device = collective_device(str(dist.get_backend()))
    flags = torch.cat([bad.to(device), torch.tensor([float(ran_out)], dtype=torch.float64, device=device)])
    dist.all_reduce(flags)
    nonfinite, ended = flags.tolist()
    return nonfinite > 0, ended > 0


def all_reduce_min(values: list[float]) -> list[float]:
    """Each value's minimum over all ranks (unchanged without a process group)."""
    if not _distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(str(dist.get_backend())))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.tolist()
