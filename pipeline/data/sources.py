"""Image sources that become shard sets: scikit-learn's bundled digits, and an image folder with class sub-folders."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from pipeline.data import storage
from pipeline.data.shards import write_shard_set
from pipeline.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def digits_split(val_fraction: float = 0.2, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The deterministic train/val split of sklearn's 1797 digits: images uint8 (N, 8, 8, 1) in 0..255, labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(round(len(labels) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return {"train": (images[train], labels[train]), "val": (images[val], labels[val])}


def write_digits(out_dir: str | Path, samples_per_shard: int = 256) -> dict[str, dict[str, Any]]:
    """Write ``out_dir/train`` and ``out_dir/val`` shard sets of the digits; returns their manifests."""
    manifests = {}
    for split, (images, labels) in digits_split().items():
        samples = ((f"{split}{i:05d}", {"image.npy": img, "cls": int(lbl)}) for i, (img, lbl) in enumerate(zip(images, labels)))
        manifests[split] = write_shard_set(
            storage.join(out_dir, split), samples, samples_per_shard=samples_per_shard,
            extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8], "dtype": "uint8",
                   "num_classes": 10, "source": "sklearn.datasets.load_digits", "split": split},
        )
    return manifests


def _class_folders(src: Path) -> list[Path]:
    from pipeline.data.fence import check_path

    check_path(src, "shards")
    if not src.is_dir():
        raise DataError(f"image folder {src} does not exist")
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image folder {src} has no class sub-folders (expected SRC/<class>/<image>.png)")
    return classes


def _load_image(path: Path, size: int | None, channels: int) -> np.ndarray:
    from pipeline.data.fence import check_path

    check_path(path, "shards")  # an image (or a link to one) inside a fence is refused
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None:
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DataError(f"image {path} cannot be read ({exc})") from None
    return array[..., None] if array.ndim == 2 else array


def write_image_folder(src: Path, out_dir: str | Path, *, size: int | None, channels: int = 3, val_fraction: float = 0.0,
                       samples_per_shard: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Shard an ImageFolder-style tree (one sub-folder per class); images are resized to ``size`` if given."""
    classes = _class_folders(src)
    items = [(path, label) for label, folder in enumerate(classes)
             for path in sorted(folder.rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise DataError(f"image folder {src} holds no PNG/JPEG images")
    from pipeline.data.fence import check_path

    for path, _ in items:  # before any image is opened: none may lie in, or link into, a fence
        check_path(path, "shards")
    if size is None:
        first = _load_image(items[0][0], None, channels)
        if any(Image.open(p).size != (first.shape[1], first.shape[0]) for p, _ in items):
            raise DataError(f"images in {src} have different sizes: pass --size to resize them")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = int(round(len(items) * val_fraction))
    splits = {"train": order[n_val:], "val": order[:n_val]} if n_val else {"train": order}
    manifests = {}
    for split, idx in splits.items():
        def samples(idx: np.ndarray = idx, split: str = split) -> Iterator[tuple[str, dict[str, Any]]]:
            for j, i in enumerate(idx):
                path, label = items[i]
                yield f"{split}{j:07d}", {"image.npy": _load_image(path, size, channels), "cls": label}
        shape = list(_load_image(items[idx[0]][0], size, channels).shape)
        manifests[split] = write_shard_set(
            storage.join(out_dir, split) if len(splits) > 1 else out_dir, samples(), samples_per_shard=samples_per_shard,
            extra={"kind": "pixels", "field": "image.npy", "shape": [shape[2], shape[0], shape[1]], "dtype": "uint8",
                   "num_classes": len(classes), "classes": [c.name for c in classes], "source": str(src), "split": split},
        )
    return manifests
