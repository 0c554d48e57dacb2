"""Exponential moving average of the weights: ``ema <- d * ema + (1 - d) * theta``.

With warm-up the decay used at step k is ``min(d, (1 + k) / (10 + k))``, so short runs are not dominated by
the random initialisation.

The EMA is a full fp32 copy of the model held by every rank. Under ZeRO-3 the parameters are partitioned, so they
are gathered (a collective: every rank calls ``update``) before the average is taken.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @staticmethod
    def _gathered(params: list[nn.Parameter]):  # noqa: ANN205
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return nullcontext()

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        # only trained parameters move; frozen ones (e.g. a LoRA base model) are neither gathered nor averaged
        live = {name: p for name, p in model.named_parameters() if p.requires_grad}
        params = [live[name] for name, _ in self.model.named_parameters() if name in live]
        with self._gathered(params):
            pairs = [(ema_p, live[name]) for name, ema_p in self.model.named_parameters() if name in live]
            if pairs:  # one fused kernel per dtype group instead of one launch per tensor
                torch._foreach_lerp_([e for e, _ in pairs], [p.detach().to(e.dtype) for e, p in pairs], 1.0 - d)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Set the EMA to the live weights (decay 0)."""
        self.update(model, 0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}
