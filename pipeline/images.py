"""Image grids for people to look at: labelled sample grids and metric curves as PNG files."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → (N, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def labelled_grid(images: torch.Tensor, rows: int, row_labels: Sequence[str] | None = None,
                  scale: int = 4, pad: int = 2) -> Image.Image:
    """A grid of ``rows`` rows (e.g. one per class) with each row's label written at its left."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    cols = int(np.ceil(n / rows))
    hs, ws = h * scale, w * scale
    label_w = 28 if row_labels else 0
    canvas = Image.new("RGB", (label_w + cols * (ws + pad) + pad, rows * (hs + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, col = divmod(i, cols)
        tile = Image.fromarray(pixels[i, :, :, 0] if c == 1 else pixels[i, :, :, :3]).convert("RGB")
        canvas.paste(tile.resize((ws, hs), Image.Resampling.NEAREST), (label_w + pad + col * (ws + pad), pad + r * (hs + pad)))
    for r, label in enumerate(row_labels or []):
        draw.text((4, pad + r * (hs + pad) + hs // 2 - 5), str(label), fill=(0, 0, 0))
    return canvas


def save_grid(images: torch.Tensor, path: Path, rows: int, row_labels: Sequence[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(images, rows, row_labels).save(path)
    return path


def save_curves(history: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> Path:
    """Metric curves (one panel per metric) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k, v in history.items() if v]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps, values = zip(*sorted(history[name]))
        ax.plot(steps, values)
        ax.set_xlabel("step")
        ax.set_title(name)
        if name == "loss":
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
