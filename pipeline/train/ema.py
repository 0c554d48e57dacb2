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

:class:`ShardedEMA` is the ZeRO-3 form (:func:`make_ema` picks it when the trained parameters are partitioned):
each rank averages only its own partition of each trained parameter (DeepSpeed's ``param.ds_tensor``, the flat
slice ``[r * s, (r + 1) * s)`` of the flattened parameter with ``s = ceil(numel / world)``), so a rank holds
``1/world`` of the EMA and an update is local (no collective). The full EMA exists only while it is written or
sampled: :meth:`ShardedEMA.checkpoint_state` and :attr:`ShardedEMA.model` gather it (collectives: every rank
calls them). ``device="cpu"`` keeps the averaged tensors in host memory (either class).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from pipeline.models.zero_init import own_slice

EMA_DEVICES = ("auto", "cpu")  # train.ema_device: auto = where the live parameters are


def _is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its ``.data`` is this rank's shard or empty outside a gather)."""
    return hasattr(p, "ds_id")


class EMA:
    """EMA of ``model``'s trained parameters; ``ema.model`` is a module sharing the frozen parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float, device: str = "auto") -> None:
        self.decay = decay
        self.offload = _ema_device(device) is not None
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
            own[name].data = own[name].data.float().to(_ema_device(device) or own[name].device)
        self._averaged = [own[name] for name in self.trained]

    @property
    def model(self) -> nn.Module:
        """The EMA module for sampling (frozen tensors re-linked to the live model's current ones first).

        With ``device="cpu"`` the averaged tensors are copied next to the live weights in a separate module.
        """
        self.relink()
        if not self.offload:
            return self._model
        live = dict(self._live.named_parameters())
        return materialise(self._model, {name: e.to(live[name].device) for name, e in
                                         zip(self.trained, self._averaged)})

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
        return decay_at(self.decay, step)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """``ema <- ema + (1 - d) (theta - ema)`` for every trained parameter, as one fused ``_foreach_lerp_``."""
        d = self.decay if decay is None else decay
        live = dict(model.named_parameters())
        params = [live[name] for name in self.trained]
        with self._gathered(params):
            if params:  # one fused kernel per dtype group instead of one launch per tensor
                torch._foreach_lerp_(self._averaged, [p.detach().to(e.device, e.dtype)
                                                      for e, p in zip(self._averaged, params)], 1.0 - d)

    def checkpoint_state(self, rank: int) -> dict[str, torch.Tensor] | None:
        """What rank 0 writes to ``ema.safetensors`` (:meth:`state_dict`); None on other ranks, no collective."""
        return self.state_dict() if rank == 0 else None

    def owned_numel(self) -> int:
        """Elements of averaged tensors this rank holds."""
        return sum(e.numel() for e in self._averaged)

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


def decay_at(decay: float, step: int) -> float:
    """Warm-up decay ``min(d, (1 + k) / (10 + k))`` at step ``k``."""
    return min(decay, (1.0 + step) / (10.0 + step))


def _ema_device(device: str) -> torch.device | None:
    """``train.ema_device``: None for ``auto`` (the live parameters' device), else that device."""
    if device not in EMA_DEVICES:
        from pipeline.config import ConfigError

        raise ConfigError(f"train.ema_device={device} is unknown (allowed: {', '.join(EMA_DEVICES)})")
    return None if device == "auto" else torch.device(device)


def _strip_deepspeed(module: nn.Module) -> None:
    """Remove what a ZeRO-3 engine put on a (deep-copied) module: its hooks and its parameter containers."""
    for m in module.modules():
        for hooks_attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(m, hooks_attr, None)
            if hooks:
                for key in [k for k, fn in hooks.items()
                            if getattr(fn, "__module__", "").startswith("deepspeed")]:
                    del hooks[key]
        if type(m._parameters) is not dict:  # DeepSpeed's ZeROOrderedDict gathers on access
            m._parameters = dict(m._parameters)
        m.__dict__.pop("_original_parameters", None)


def materialise(template: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """An eval-mode copy of ``template``'s structure whose parameter ``name`` is ``tensors[name]`` (else the
    template's own tensor, aliased) and whose buffers alias the template's; frozen, without DeepSpeed's hooks."""
    memo: dict[int, object] = {}
    for name, p in template.named_parameters():
        memo[id(p)] = nn.Parameter(tensors[name] if name in tensors else p.detach(), requires_grad=False)
    for b in template.buffers():
        memo[id(b)] = b.detach()
    copy_ = copy.deepcopy(template, memo)
    _strip_deepspeed(copy_)
    return copy_.eval().requires_grad_(False)


class ShardedEMA:
    """ZeRO-3 EMA: each rank averages only its partition of each trained parameter (no per-step collective).

    ``ema_r <- ema_r + (1 - d) (theta_r - ema_r)`` where ``theta_r`` is this rank's ``ds_tensor`` (the partition
    the optimizer updates in place). Gathered only by :meth:`checkpoint_state`, :meth:`state_dict` and
    :attr:`model`, which are collectives.
    """

    def __init__(self, model: nn.Module, decay: float, device: str = "auto") -> None:
        self.decay = decay
        self._live = model
        live = dict(model.named_parameters())
        self.trained: list[str] = [name for name, p in live.items() if p.requires_grad]
        not_sharded = [n for n in self.trained if not _is_partitioned(live[n])]
        if not_sharded:
            raise ValueError(f"ShardedEMA needs ZeRO-3 partitioned parameters; '{not_sharded[0]}' is not")
        target = _ema_device(device)
        self.sample_device: torch.device | None = None  # where :attr:`model` puts the gathered EMA (the engine's)
        self._shards: list[torch.Tensor] = []
        for name in self.trained:
            p = live[name]
            _, size, valid = own_slice(p)
            shard = torch.zeros(size, dtype=torch.float32, device=target or p.ds_tensor.device)
            shard[:valid].copy_(p.ds_tensor.detach()[:valid])
            self._shards.append(shard)

    def decay_at(self, step: int) -> float:
        return decay_at(self.decay, step)

    def owned_numel(self) -> int:
        """Elements of averaged tensors this rank holds (about ``1/world`` of the trained elements)."""
        return sum(s.numel() for s in self._shards)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """The lerp on this rank's partitions only, one fused ``_foreach_lerp_`` (padding stays zero)."""
        d = self.decay if decay is None else decay
        live = dict(model.named_parameters())
        ema, theta = [], []
        for name, shard in zip(self.trained, self._shards):
            p = live[name]
            valid = own_slice(p)[2]
            if valid:
                ema.append(shard[:valid])
                theta.append(p.ds_tensor.detach()[:valid].to(shard.device, torch.float32))
        if ema:
            torch._foreach_lerp_(ema, theta, 1.0 - d)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        self.update(model, 0.0)

    @torch.no_grad()
    def _gather(self, name: str, shard: torch.Tensor) -> torch.Tensor:
        """The full fp32 EMA of parameter ``name`` (collective over its partition group), on the CPU."""
        p = dict(self._live.named_parameters())[name]
        group = p.ds_process_group
        from pipeline.train.collectives import collective_device

        device = collective_device(str(dist.get_backend(group)))
        parts = [torch.empty_like(shard, device=device) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, shard.to(device), group=group)
        return torch.cat(parts)[:p.ds_numel].view(p.ds_shape).cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full averaged tensors by name, fp32 on the CPU, on every rank (collective)."""
        return {name: self._gather(name, shard) for name, shard in zip(self.trained, self._shards)}

    def checkpoint_state(self, rank: int) -> dict[str, torch.Tensor] | None:
        """The full EMA on rank 0, None elsewhere (collective; other ranks hold one gathered tensor at a time)."""
        out: dict[str, torch.Tensor] = {}
        for name, shard in zip(self.trained, self._shards):
            full = self._gather(name, shard)
            if rank == 0:
                out[name] = full
        return out if rank == 0 else None

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's partition of each full tensor (a file every rank reads); same checks as :class:`EMA`."""
        live = dict(self._live.named_parameters())
        missing = [name for name in self.trained if name not in state]
        if missing:
            raise ValueError(f"EMA state has no tensor for trained parameter '{missing[0]}' ({len(missing)} missing)")
        known = set(live) | {name for name, _ in self._live.named_buffers()}
        unknown = [k for k in state if k not in known]
        if unknown:
            raise ValueError(f"EMA state has tensor '{unknown[0]}' that the model does not have ({len(unknown)} unknown)")
        for name, shard in zip(self.trained, self._shards):
            p = live[name]
            if tuple(state[name].shape) != tuple(p.ds_shape):
                raise ValueError(f"EMA state tensor '{name}' has shape {tuple(state[name].shape)}, "
                                 f"the model {tuple(p.ds_shape)}")
            start, _, valid = own_slice(p)
            shard.zero_()
            shard[:valid].copy_(state[name].reshape(-1)[start:start + valid])

    @property
    def model(self) -> nn.Module:
        """A plain module with the full EMA weights and the live frozen weights, for sampling (collective: every
        rank builds it; the frozen ZeRO-3 parameters are gathered and copied for as long as it is held)."""
        device = self.sample_device
        tensors = {name: t.to(device) if device is not None else t for name, t in self.state_dict().items()}
        frozen = [(n, p) for n, p in self._live.named_parameters() if n not in tensors]
        with EMA._gathered([p for _, p in frozen]):
            for name, p in frozen:
                tensors[name] = p.detach().clone() if _is_partitioned(p) else p.detach()
        return materialise(self._live, tensors)


def make_ema(model: nn.Module, decay: float, device: str = "auto") -> EMA | ShardedEMA:
    """:class:`ShardedEMA` when ``model``'s trained parameters are ZeRO-3 partitioned, else :class:`EMA`."""
    trained = [p for p in model.parameters() if p.requires_grad]
    if trained and all(_is_partitioned(p) for p in trained):
        return ShardedEMA(model, decay, device)
    return EMA(model, decay, device)


def load_ema_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load a checkpoint's EMA tensors into a freshly built ``model`` (``strict=False``).

    Returns ``(missing, unexpected)`` where ``missing`` lists only the *trainable* parameters absent from ``state``:
    frozen parameters and buffers are not saved by :meth:`EMA.state_dict` and come from the model's construction.
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return [k for k in missing if k in trainable], list(unexpected)
