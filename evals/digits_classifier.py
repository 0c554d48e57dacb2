"""A small CNN digit classifier, trained deterministically on the digits train split, for ``fd_digits``.

Its penultimate layer (64-d) is the feature space of the Fréchet distance ``fd_digits`` and of precision/recall on
the embedded digits default; ``predict`` scores class-conditional samples (does a "3" look like a 3). It never sees
the validation split, which serves as the reference set.

Inputs are images in [-1, 1] of shape (B, 1, H, W) at any H; they are resized to the native 16x16 with the same
antialiased bilinear resize that the training data pipeline applies (``pipeline.data.streaming.Decode``).
Training is seeded, single-threaded and uses deterministic kernels, so the cached weights are reproducible.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NATIVE_SIZE = 16
FEATURE_DIM = 64
NUM_CLASSES = 10
# Everything that determines the trained weights; changing any of it changes the cache file name.
RECIPE = {"version": 1, "arch": "conv16-conv16-pool-conv32-pool-fc64", "size": NATIVE_SIZE, "epochs": 10,
          "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "seed": 0, "split": "digits_split(0.2, seed=0)",
          "augment": "shift<=1px"}


def resize(images: torch.Tensor, size: int = NATIVE_SIZE) -> torch.Tensor:
    """Antialiased bilinear resize to ``size`` x ``size`` (identity when already that size), clamped to [-1, 1]."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"the digits classifier needs grey images of shape (B, 1, H, W), got {tuple(images.shape)}")
    images = images.float()
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)


def uint8_to_model_space(images: np.ndarray, size: int | None) -> torch.Tensor:
    """uint8 (N, H, W, 1) → float (N, 1, size, size) in [-1, 1], as the training data pipeline decodes pixels."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x if size is None else resize(x, size)


class DigitsClassifier(nn.Module):
    """conv(16) → conv(16) → pool → conv(32) → pool → fc(64) = features → fc(10) = logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (NATIVE_SIZE // 4) ** 2, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.val_accuracy: float | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10) for images in [-1, 1] at any size."""
        return self.head(self.body(resize(images)))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Penultimate-layer features (B, 64), float64."""
        outs = [self.body(resize(chunk)) for chunk in images.split(batch_size)]
        return torch.cat(outs).double()

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Predicted class (B,) int64."""
        return torch.cat([self(chunk).argmax(1) for chunk in images.split(batch_size)])


def _recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def digits_images(split: str, size: int | None = NATIVE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits ``train`` or ``val`` split (the shards' split) as images in [-1, 1] and labels."""
    from pipeline.data.sources import digits_split

    images, labels = digits_split()[split]
    return uint8_to_model_space(images, size), torch.from_numpy(labels)


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (background -1 fills in)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


@torch.enable_grad()  # callers may score under torch.no_grad() (pipeline/sweep/evaluation.py)
def train_classifier() -> DigitsClassifier:
    """Train on the digits train split only (deterministic); sets ``val_accuracy`` on the val split."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        generator = torch.Generator().manual_seed(RECIPE["seed"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RECIPE["seed"])
            model = DigitsClassifier()
        x, y = digits_images("train")
        opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
        steps = RECIPE["epochs"] * -(-len(x) // RECIPE["batch_size"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=RECIPE["lr"], total_steps=steps)
        model.train()
        for _ in range(RECIPE["epochs"]):
            order = torch.randperm(len(x), generator=generator)
            for idx in order.split(RECIPE["batch_size"]):
                loss = F.cross_entropy(model(_shift(x[idx], generator)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        xv, yv = digits_images("val")
        model.val_accuracy = float((model.predict(xv) == yv).double().mean())
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return model.requires_grad_(False)


def classifier_path(cache_dir: str | Path | None = None) -> Path:
    from evals.reference import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / f"digits_classifier-{_recipe_hash()}.safetensors"


def load_digits_classifier(cache_dir: str | Path | None = None) -> DigitsClassifier:
    """The cached classifier, trained (a few CPU seconds) and cached on first use."""
    from safetensors.torch import load_file, save_file

    path = classifier_path(cache_dir)
    if path.is_file():
        from safetensors import safe_open

        model = DigitsClassifier()
        model.load_state_dict(load_file(str(path)))
        with safe_open(str(path), "pt") as fh:
            model.val_accuracy = float(fh.metadata()["val_accuracy"])
        return model.eval().requires_grad_(False)
    model = train_classifier()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    save_file(model.state_dict(), str(tmp), metadata={"val_accuracy": repr(model.val_accuracy),
                                                      "recipe": json.dumps(RECIPE, sort_keys=True)})
    tmp.replace(path)
    return model
