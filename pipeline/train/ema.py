"""Exponential moving average of the trained weights: ``ema <- d * ema + (1 - d) * theta``.

With warm-up the decay used at step k is ``min(d, (1 + k) / (10 + k))``, so short runs are not dominated by
the random initialisation.

Only trained parameters (``requires_grad`` when the EMA is made) are averaged, so only they are copied: the EMA
holds an fp32 copy of each of them. Frozen parameters (a LoRA run's base model, SiT's sin-cos table) and buffers
of ``ema.model`` alias the live model's tensors (same storage, no copy); reading ``ema.model`` re-links them to
the live model's current tensors, so a device move or dtype cast of the live model (DeepSpeed's engine) does not
leave a stale second copy behind. Under ZeRO-3 the live parameters are partitioned: trained ones are gathered (a
collective: every rank calls ``update``) before the average is taken, and a partitioned frozen parameter keeps
the full tensor it had when the EMA was made, so ``ema.model`` still samples on one rank without collectives.

:meth:`EMA.state_dict` (what checkpoints save) holds the averaged tensors only; the frozen rest is rebuilt by
constructing the model (``flux.weights``, ``init_from``, fixed tables), see :func:`load_ema_weights`.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn


def _is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its ``.data`` is this rank's shard or empty outside a gather)."""
    return hasattr(p, "ds_id")


class EMA:
    """EMA of ``model``'s trained parameters; ``ema.model`` is a module sharing the frozen parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self._live = model
        self.trained: list[str] = [name for name, p in model.named_parameters() if p.requires_grad]
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        # deepcopy with a memo that maps every frozen parameter / buffer to an alias of its storage: the module
        # structure is copied, those tensors are not
        memo: dict[int, object] = {}
        for p in model.parameters():
            if id(p) not in trained:
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
        for b in model.buffers():
            memo[id(b)] = b.detach()
        self._model = copy.deepcopy(model, memo).eval().requires_grad_(False)
        own = dict(self._model.named_parameters())
        for name in self.trained:
            own[name].data = own[name].data.float()
        self._averaged = [own[name] for name in self.trained]

    @property
    def model(self) -> nn.Module:
        """The EMA module for sampling (frozen tensors re-linked to the live model's current ones first)."""
        self.relink()
        return self._model

    @torch.no_grad()
    def relink(self) -> None:
        """Point the EMA's frozen parameters and buffers at the live model's current tensors (no copies)."""
        trained = set(self.trained)
        live = dict(self._live.named_parameters())
        for name, p in self._model.named_parameters():
            src = live.get(name)
            if name in trained or src is None or _is_partitioned(src):
                continue  # averaged, or a ZeRO-3 shard: keep the full tensor held since construction
            if p.data_ptr() != src.data_ptr() or p.dtype != src.dtype or p.device != src.device:
                p.data = src.detach()
        live_buffers = dict(self._live.named_buffers())
        for name, module in self._model.named_modules():
            for key, buf in list(module._buffers.items()):
                src = live_buffers.get(f"{name}.{key}" if name else key)
                if buf is not None and src is not None and buf.data_ptr() != src.data_ptr():
                    module._buffers[key] = src.detach()

    @staticmethod
    def _gathered(params: list[nn.Parameter]):
        if any(_is_partitioned(p) for p in params):
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return nullcontext()

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """``ema <- ema + (1 - d) (theta - ema)`` for every trained parameter, as one fused ``_foreach_lerp_``."""
        d = self.decay if decay is None else decay
        live = dict(model.named_parameters())
        params = [live[name] for name in self.trained]
        with self._gathered(params):
            if params:  # one fused kernel per dtype group instead of one launch per tensor
                torch._foreach_lerp_(self._averaged, [p.detach().to(e.dtype) for e, p in zip(self._averaged, params)],
                                     1.0 - d)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Set the EMA to the live weights (decay 0)."""
        self.update(model, 0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged (trained) tensors only, by parameter name, fp32, contiguous copies."""
        return {name: e.detach().clone().contiguous() for name, e in zip(self.trained, self._averaged)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the averaged tensors exactly; keys of frozen tensors (older full-state files) are ignored."""
        missing = [name for name in self.trained if name not in state]
        if missing:
            raise ValueError(f"EMA state has no tensor for trained parameter '{missing[0]}' ({len(missing)} missing)")
        known = set(self._model.state_dict().keys())
        unknown = [k for k in state if k not in known]
        if unknown:
            raise ValueError(f"EMA state has tensor '{unknown[0]}' that the model does not have ({len(unknown)} unknown)")
        for name, e in zip(self.trained, self._averaged):
            if state[name].shape != e.shape:
                raise ValueError(f"EMA state tensor '{name}' has shape {tuple(state[name].shape)}, "
                                 f"the model {tuple(e.shape)}")
            e.copy_(state[name])


def load_ema_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load a checkpoint's EMA tensors into a freshly built ``model`` (``strict=False``).

    Returns ``(missing, unexpected)`` where ``missing`` lists only the *trainable* parameters absent from ``state``:
    frozen parameters and buffers are not saved by :meth:`EMA.state_dict` and come from the model's construction.
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return [k for k in missing if k in trainable], list(unexpected)
