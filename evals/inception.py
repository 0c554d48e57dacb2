"""Standard FID features: Inception-v3 pool3 (2048-d) with the TensorFlow 2015-12-05 weights.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the one torchmetrics' FID also uses): a port of the
TF graph with TF1-compatible bilinear resizing to 299x299 and the ``(x - 128) / 128`` input scaling. Only with these
weights may a Fréchet distance be called FID.

Weights are never downloaded. They are looked up, in order, at ``eval.inception_weights`` (config), the environment
variable ``FLOWRAIL_INCEPTION_WEIGHTS``, and ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``
(torch-fidelity's cache location).

torch-fidelity's package ``__init__`` imports torchvision (for its CLIP/VGG/DINOv2 extractors), which the CPU torch
wheel here cannot sit beside. The Inception extractor itself needs only torch, so when the normal import fails for
lack of torchvision we register the package without executing its ``__init__`` and import the submodule alone.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from evals.frechet import RunningStats
from pipeline.errors import first_line

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "FLOWRAIL_INCEPTION_WEIGHTS"
FEATURE_DIM = 2048


def _import_extractor_module() -> ModuleType:
    """``torch_fidelity.feature_extractor_inceptionv3``, without torchvision if need be."""
    name = "torch_fidelity.feature_extractor_inceptionv3"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != "torchvision":
            raise ModuleNotFoundError(
                "FID needs torch-fidelity (pip install --no-deps 'torch-fidelity>=0.3')") from None
    # The package __init__ failed on torchvision: drop its half-imported modules and register a bare package
    # (search path only, __init__ not executed) so the torch-only submodules import on their own.
    for mod in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
        del sys.modules[mod]
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("FID needs torch-fidelity (pip install --no-deps 'torch-fidelity>=0.3')")
    package = importlib.util.module_from_spec(spec)
    sys.modules["torch_fidelity"] = package
    return importlib.import_module(name)


def find_inception_weights(configured: str | None = None) -> Path:
    """The local Inception weights file, or a one-line FileNotFoundError saying where to put it."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"eval.inception_weights={configured}: no such file (expected {WEIGHTS_FILENAME})")
        return path
    if os.environ.get(WEIGHTS_ENV):
        path = Path(os.environ[WEIGHTS_ENV]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{WEIGHTS_ENV}={path}: no such file (expected {WEIGHTS_FILENAME})")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME
    if cached.is_file():
        return cached
    raise FileNotFoundError(
        f"FID needs the Inception-v3 weights file {WEIGHTS_FILENAME} (torch-fidelity release v0.2.0); "
        f"nothing is downloaded at run time: put it at {cached}, or set eval.inception_weights=PATH "
        f"or {WEIGHTS_ENV}=PATH")


class InceptionFeatures:
    """Images in [-1, 1] of shape (B, C, H, W) with C in {1, 3} -> pool3 features (B, 2048), float64.

    Images are quantised to uint8 as ``round((x + 1) * 127.5)`` (what saving a PNG would do), grey images are
    repeated to RGB, and the extractor resizes to 299x299 the TF1 way.
    """

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64) -> None:
        path = find_inception_weights(str(weights) if weights is not None else None)
        try:
            # Safe loading: a tensors-only state dict. torch-fidelity itself calls torch.load(weights_only=False),
            # so it is handed a re-serialised copy of what we verified, never the user's file.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling error means "not a plain state dict"
            raise ValueError(f"Inception weights {path} are not a plain tensor state dict: "
                             f"{first_line(exc, None)}") from None
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        module = _import_extractor_module()
        try:
            self.model = module.FeatureExtractorInceptionV3(
                "inception-v3-compat", [str(FEATURE_DIM)], feature_extractor_weights_path=buffer)
        except RuntimeError as exc:  # load_state_dict: wrong keys/shapes
            raise ValueError(f"Inception weights {path} do not match torch-fidelity's InceptionV3: "
                             f"{first_line(exc, None)}") from None
        self.device = torch.device(device)
        self.model.to(self.device)
        self.batch_size = batch_size

    @staticmethod
    def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] float (B, C, H, W) -> uint8 (B, 3, H, W)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images of shape (B, 1|3, H, W), got {tuple(images.shape)}")
        x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.to_uint8_rgb(images)
        out = [self.model(chunk.to(self.device))[0] for chunk in x.split(self.batch_size)]
        return torch.cat(out).double().cpu()

    def stats(self, batches) -> RunningStats:
        """Accumulate pool3 statistics over an iterable of image batches."""
        stats = RunningStats(FEATURE_DIM)
        for images in batches:
            stats.update(self(images))
        return stats


def fid_from_stats(stats: RunningStats, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """FID of accumulated pool3 statistics against reference ``(mu, sigma)``."""
    from evals.frechet import frechet_distance

    return frechet_distance(stats.mean, stats.cov, *reference)
