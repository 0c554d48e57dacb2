"""In-place initialisation of parameters that ``deepspeed.zero.Init`` may already have partitioned.

Under ``deepspeed.zero.Init`` (ZeRO-3 model construction) every submodule's parameters are partitioned across the
ranks as soon as that submodule's ``__init__`` returns: ``param.data`` is then empty and each rank holds only its
slice. A parent module that re-initialises a child afterwards (SiT's DiT initialisation) must gather that child's
parameters first; :func:`gathered_for_init` does so for one small group at a time, so no rank ever holds more than
that group in full. Rank 0's values are kept (every rank draws the same values from the same seed anyway).
Outside ``zero.Init`` it does nothing.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from torch import nn


def gathered_for_init(*items: nn.Module | nn.Parameter | None) -> AbstractContextManager:
    """Gather the partitioned parameters among ``items`` (modules: all their parameters) for modification."""
    params: list[nn.Parameter] = []
    for item in items:
        if isinstance(item, nn.Module):
            params.extend(item.parameters())
        elif item is not None:
            params.append(item)
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def own_slice(p: nn.Parameter) -> tuple[int, int, int]:
    """A ZeRO-3 parameter's partition on this rank: ``(start, size, valid)``. Rank ``r`` of the parameter's group
    owns the flat elements ``[r * size, (r + 1) * size)`` of the flattened parameter (``size = ceil(numel / world)``),
    of which ``valid`` are real (the rest is padding past ``numel``)."""
    import torch.distributed as dist

    size = p.ds_tensor.ds_numel
    start = dist.get_rank(group=p.ds_process_group) * size
    return start, size, max(0, min(size, p.ds_numel - start))
