"""The frozen teacher of flow-map distillation (``flow_map.target=teacher``).

Built with the student's architecture (``model.*``) and loaded from ``flow_map.teacher`` or ``init_from`` (a
flowrail checkpoint's EMA weights or an official SiT/DiT checkpoint), on each rank, in eval mode without
gradients. Its velocity is guided when ``flow_map.teacher_guidance != 1``: ``v = v_u + w (v_c - v_u)`` for
labelled samples (the label-dropped ones get the unconditional ``v_u``), so the flow map learns the guided flow.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import TrainJobConfig


def load_teacher(cfg: TrainJobConfig, *, in_channels: int, input_size: int, num_classes: int,
                 device: torch.device) -> nn.Module:
    from pipeline.models import build_model
    from pipeline.train.init_from import initialise_from

    path = cfg.flow_map.teacher or cfg.init_from
    model = build_model(cfg.model.model_copy(update={"grad_checkpointing": False}), in_channels=in_channels,
                        input_size=input_size, num_classes=num_classes)
    initialise_from(model, str(path))
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def teacher_velocity(teacher: nn.Module, x: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None,
                     null_label: int, guidance: float = 1.0) -> torch.Tensor:
    """``v(x, s | y)``, guided with scale ``guidance`` where ``y`` is not the null label."""
    cond = teacher(x, s, y=y)
    if y is None or guidance == 1.0:
        return cond
    uncond = teacher(x, s, y=torch.full_like(y, null_label))
    labelled = (y != null_label).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.where(labelled, uncond + guidance * (cond - uncond), cond)
