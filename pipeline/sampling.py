"""Sampling from a trained model: class-conditional batches and the labelled grid logged after training."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.images import save_grid
from pipeline.objective import SampleOutput


@torch.no_grad()
def sample_classes(trained, labels: torch.Tensor, seed: int, batch_size: int = 256) -> SampleOutput:  # noqa: ANN001
    """Samples for the given class labels (pixels in [-1, 1]; latents are decoded when the data are latents)."""
    generator = torch.Generator().manual_seed(seed)
    shape = trained.image_shape
    outs, nfe = [], 0
    for chunk in labels.split(batch_size):
        out = trained.objective.sample(trained.model, {"label": chunk}, (len(chunk), *shape), generator)
        outs.append(out.x)
        nfe = out.nfe
    x = torch.cat(outs)
    if trained.data.kind == "latents":
        from pipeline.data.encode import decode_latents_from_info

        x = decode_latents_from_info(x, trained.data)
    return SampleOutput(x=x, nfe=nfe)


def class_grid(trained, path: Path, per_class: int, seed: int) -> tuple[Path, int]:  # noqa: ANN001
    """A grid with one row per class (``per_class`` samples each); returns its path and the NFE per sample."""
    classes = max(trained.num_classes, 1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    out = sample_classes(trained, labels, seed)
    names = [str(c) for c in range(classes)] if trained.num_classes else None
    return save_grid(out.x, path, rows=classes, row_labels=names), out.nfe
