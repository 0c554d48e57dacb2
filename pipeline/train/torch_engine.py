"""A plain PyTorch training engine for one worker (``train.engine=torch``), with the DeepSpeed engine's interface.

On one rank ZeRO-1/2 partition nothing, yet DeepSpeed's engine still wraps every forward, runs its own backward
hooks and gradient reduction over a group of one, and clips in Python: about 2.7 ms per step above a bare loop around
a near-free model (``benchmarks/RESULTS.md``). This engine does only what the step needs:

- ``backward(loss)``: ``(loss / grad_accum_steps).backward()`` (DeepSpeed's ``scale_wrt_gas``);
- ``step()``: at the window's last micro-batch, clip the global gradient norm to ``train.grad_clip``
  (``clip_grad_norm_``), AdamW step, warm-up scheduler step, gradients set to None;
- the checkpoint: ``torch_engine/state/engine.pt`` (module state dict, optimizer, scheduler, step counters, the
  caller's client state) beside flowrail's EMA and metadata, read back with ``weights_only=True``.

bf16 is the worker's ``torch.autocast`` over fp32 weights, as with DeepSpeed's ``torch_autocast`` (flowrail never
casts the module). The engine the checkpoint was written by must be the engine that resumes it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import TrainConfig

STATE_FILE = "engine.pt"


class TorchEngine:
    """The part of ``deepspeed.DeepSpeedEngine`` flowrail's loop, checkpoints and EMA use, for a single rank."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig,
                 device: torch.device) -> None:
        self.module = model.to(device)
        self.optimizer, self.lr_scheduler = optimizer, scheduler
        self.device = device
        self.grad_accum_steps, self.grad_clip = cfg.grad_accum_steps, cfg.grad_clip
        self.micro_steps = 0
        self.global_steps = 0
        self._params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    forward = __call__

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the next ``step()`` ends the accumulation window (asked before it, as DeepSpeed's is)."""
        return (self.micro_steps + 1) % self.grad_accum_steps == 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum_steps if self.grad_accum_steps > 1 else loss).backward()

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.zero_grad()
            self.global_steps += 1
        self.micro_steps += 1

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def compile(self, backend: str = "inductor") -> None:
        """``nn.Module.compile`` in place: state-dict keys, checkpoints and the EMA see the plain module."""
        self.module.compile(backend=backend)

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any] | None = None) -> None:
        target = Path(save_dir) / tag
        target.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.lr_scheduler.state_dict(), "micro_steps": self.micro_steps,
                    "global_steps": self.global_steps, "client_state": dict(client_state or {})},
                   target / STATE_FILE)

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str | None, dict[str, Any] | None]:
        """``(path, client state)``, or ``(None, None)`` when ``load_dir/tag`` holds no engine state (as DeepSpeed)."""
        path = Path(load_dir) / tag / STATE_FILE
        if not path.is_file():
            return None, None
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.micro_steps, self.global_steps = int(state["micro_steps"]), int(state["global_steps"])
        return str(path), state["client_state"]


def engine_device(cfg: TrainConfig) -> torch.device:
    """This rank's device: its GPU under Ray Train (``ray.train.torch.get_device``) or the CPU."""
    if cfg.use_gpu and torch.cuda.is_available():
        try:
            import ray.train.torch

            return ray.train.torch.get_device()
        except RuntimeError:  # outside a Ray Train worker (tests, benchmarks)
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_torch_engine(cfg: TrainConfig, world_size: int) -> None:
    """``train.engine=torch`` is one rank without partitioning: refused in one line otherwise."""
    from pipeline.config import ConfigError

    reasons = [why for bad, why in [
        (world_size != 1, f"train.num_workers={world_size} (it trains on one worker)"),
        (cfg.zero_stage == 3, "train.zero_stage=3 (it partitions nothing)"),
        (cfg.offload, "train.offload=true"),
        (bool(cfg.deepspeed_preset), f"train.deepspeed_preset={cfg.deepspeed_preset}"),
    ] if bad]
    if reasons:
        raise ConfigError(f"train.engine=torch does not support {reasons[0]}: use train.engine=deepspeed")
