"""Per-rank bytes of what a rank owns after a training step, counted from its tensors (each storage once).

Categories, in the order a storage is attributed (a storage shared by two, e.g. DeepSpeed's fp32 master partition
aliasing the ZeRO-3 parameter partition, counts in the first):

- params: the module's parameters; under ZeRO-3 the rank's partition ``ds_tensor`` (and a full copy only where
  DeepSpeed keeps one, ``ds_persist`` parameters);
- grads: the ZeRO optimizer's gradient partitions (ZeRO-2 ``averaged_gradients``, ZeRO-3
  ``grad_partitions_flat_buffer``), taken between backward and step, when they exist;
- optimizer: the fp32 master partitions and the torch AdamW moments;
- ema: the EMA's averaged tensors (ZeRO-3: this rank's shards).
Communication buckets (``ipg`` buffers, all-gather prefetch) are not counted; peak RSS is reported beside.
"""
from __future__ import annotations

from typing import Any

import torch


class Ledger:
    """Bytes by category, counting each tensor storage once."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {"params": 0, "grads": 0, "optimizer": 0, "ema": 0}
        self._seen: set[int] = set()

    def add(self, category: str, tensor: torch.Tensor | None) -> None:
        if tensor is None or tensor.numel() == 0:
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self._seen:
            return
        self._seen.add(storage.data_ptr())
        self.bytes[category] += storage.nbytes()


def count_params(ledger: Ledger, model: torch.nn.Module) -> None:
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            ledger.add("params", p.ds_tensor)
        ledger.add("params", p.data)


def count_grads(ledger: Ledger, engine: Any) -> None:
    opt = engine.optimizer
    flat = getattr(opt, "grad_partitions_flat_buffer", None)  # ZeRO-3
    if flat is not None:
        ledger.add("grads", flat)
    for group in getattr(opt, "averaged_gradients", {}).values():  # ZeRO-1/2
        for g in group or []:
            ledger.add("grads", g)
    if not hasattr(opt, "optimizer"):  # stage 0 (ZeRO-1/2 on one worker): the torch optimizer, grads on the params
        for p in engine.module.parameters():
            if p.grad is not None:
                ledger.add("grads", p.grad)


def count_optimizer(ledger: Ledger, engine: Any) -> None:
    opt = engine.optimizer
    for master in (getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
                   or getattr(opt, "fp32_partitioned_groups_flat", None) or []):  # ZeRO-3
        ledger.add("optimizer", master)
    for state in getattr(opt, "optimizer", opt).state.values():  # stage 0: no fp32 master copy, the moments only
        for value in state.values():
            if torch.is_tensor(value):
                ledger.add("optimizer", value)


def count_ema(ledger: Ledger, ema: Any) -> None:
    for t in getattr(ema, "_shards", None) or getattr(ema, "_averaged", []):
        ledger.add("ema", t)
