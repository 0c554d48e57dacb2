"""Latent pre-encoding for SiT/DFM: image shards -> autoencoder latent shards (Ray Data actors), and decoding back.

Per sample: ``latent.npy`` (C_z, H/f, W/f) float32 ``= scale * z`` with ``z`` the posterior mean (or a sample) of a
diffusers ``AutoencoderKL`` (sd-vae-ft-ema layout, loaded from a local folder only) applied to the image in
[-1, 1], and ``cls`` the label. ``scale`` is the autoencoder's ``scaling_factor`` (0.18215 for the SD autoencoders)
unless given; it is recorded in the manifest as ``latent_scale`` together with the autoencoder folder (``vae``), so
training streams latent shards like pixel shards and sampling decodes ``x = D(latent / scale)``.

Encoding runs in a Ray Data actor pool (``map_batches`` with a callable class and ``concurrency``); the driver writes
the shards with :class:`pipeline.data.shards.ShardSetWriter` in the source order.
"""
from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data import storage
from pipeline.data.safe_decode import numpy_batches, safe_decode
from pipeline.data.shards import MANIFEST, ShardSetWriter, read_manifest, shard_paths
from pipeline.errors import DataError

SD_LATENT_SCALE = 0.18215


def load_vae(path: str | Path, device: str | torch.device = "cpu"):
    """A diffusers ``AutoencoderKL`` from a local folder (no download), in eval mode without gradients."""
    from diffusers import AutoencoderKL

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"autoencoder folder {path} not found (expected a diffusers AutoencoderKL folder "
                                "with config.json, e.g. sd-vae-ft-ema)")
    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    vae.requires_grad_(False)
    return vae


def vae_scale(vae, scale: float | None = None) -> float:
    """The latent scale: ``scale`` if given, else the autoencoder's ``scaling_factor`` (else 0.18215)."""
    if scale is not None:
        return float(scale)
    return float(getattr(vae.config, "scaling_factor", None) or SD_LATENT_SCALE)


def to_vae_input(pixels: torch.Tensor, vae_channels: int, size: int | None = None) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) -> the autoencoder's channel count (grey repeated to RGB), resized if asked."""
    c = pixels.shape[1]
    if c != vae_channels:
        if c == 1:
            pixels = pixels.expand(-1, vae_channels, -1, -1)
        else:
            raise DataError(f"images have {c} channels but the autoencoder expects {vae_channels}")
    if size is not None and pixels.shape[-1] != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False).clamp(-1, 1)
    return pixels


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, scale: float, posterior: Literal["mean", "sample"] = "mean",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``scale * z`` with ``z`` the posterior mean (or a sample) of ``E(pixels)``; pixels in [-1, 1]."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    z = dist.mean if posterior == "mean" else dist.sample(generator)
    return z.float() * scale


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Latents (already scaled) -> images in [-1, 1]: ``D(latents / scale)``."""
    z = latents.to(vae.device, vae.dtype) / vae_scale(vae, scale)
    return vae.decode(z).sample.float().clamp(-1, 1).cpu()


@lru_cache(maxsize=2)
def _cached_vae(path: str):
    return load_vae(path)


def decode_latents_from_info(latents: torch.Tensor, info: Any) -> torch.Tensor:
    """Decode samples of a latent shard set described by a ``DataInfo`` (its ``vae`` folder and ``latent_scale``)."""
    if not info.vae:
        raise DataError("latent shard set has no 'vae' in its manifest; cannot decode samples to images")
    return decode_latents(_cached_vae(str(info.vae)), latents, info.latent_scale)


class LatentEncoder:
    """Ray Data actor: a numpy batch of pixel samples -> ``__key__``, ``latent`` (B, C_z, h, w), ``cls``."""

    def __init__(self, vae_dir: str, field: str, size: int | None, scale: float | None,
                 posterior: Literal["mean", "sample"] = "mean", device: str = "cpu", seed: int = 0) -> None:
        if device == "cpu":
            torch.set_num_threads(1)  # one intra-op thread per actor; scale out with more actors
        self.vae = load_vae(vae_dir, device)
        self.field, self.size, self.posterior, self.seed = field, size, posterior, seed
        self.scale = vae_scale(self.vae, scale)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["__key__"]]
        if self.field not in batch:
            raise DataError(f"sample {keys[0]} has no '{self.field}' member")
        images = []
        for key, value in zip(keys, batch[self.field]):
            arr = np.asarray(value)
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.ndim != 3 or arr.dtype != np.uint8:
                raise DataError(f"sample {key}: expected a uint8 HWC image, got {arr.dtype} {arr.shape}")
            images.append(arr)
        try:
            stacked = np.stack(images)
        except ValueError:
            raise DataError(f"images in the batch starting at {keys[0]} differ in shape; pass a size to resize") from None
        pixels = torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        pixels = to_vae_input(pixels, self.vae.config.in_channels, self.size)
        generator = torch.Generator(device=self.vae.device).manual_seed(self.seed + zlib.crc32(keys[0].encode()))
        latent = encode_pixels(self.vae, pixels, self.scale, self.posterior, generator)
        labels = batch.get("cls")
        cls = np.asarray([-1] * len(keys) if labels is None else labels, dtype=np.int64)
        return {"__key__": np.asarray(keys), "latent": latent.cpu().numpy().astype(np.float32), "cls": cls}


def encode_shard_set(src: str | Path, out: str | Path, vae_dir: str | Path, *, size: int | None = None,
                     scale: float | None = None, posterior: Literal["mean", "sample"] = "mean",
                     batch_size: int = 64, concurrency: int = 1, num_cpus: float = 1, num_gpus: float = 0,
                     samples_per_shard: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Encode the pixel shard set ``src`` into a latent shard set at ``out``; returns the new manifest.

    ``src`` and ``out`` are local directories or URLs of any filesystem pyarrow knows (``s3://``, ``gs://``;
    :mod:`pipeline.data.storage`); the autoencoder folder is local."""
    import ray

    from pipeline.data.fence import check_readable

    check_readable(str(src), job="encode")  # the path, its links and its manifest's shards, before any read
    manifest = read_manifest(src)
    check_readable(manifest, job="encode")
    if manifest.get("kind", "pixels") != "pixels":
        raise DataError(f"shard set {src} holds {manifest.get('kind')}, not pixels; nothing to encode")
    vae_dir = Path(vae_dir).resolve()
    vae = load_vae(vae_dir)  # fail fast in the driver, and read the scale the actors will use
    latent_scale = vae_scale(vae, scale)
    field = manifest.get("field", "image.npy")
    device = "cuda" if num_gpus > 0 else "cpu"
    ds = ray.data.read_webdataset(shard_paths(src, manifest), decoder=safe_decode)  # never unpickles
    ds = ds.map_batches(LatentEncoder, fn_constructor_kwargs=dict(vae_dir=str(vae_dir), field=field, size=size,
                                                                 scale=latent_scale, posterior=posterior,
                                                                 device=device, seed=seed),
                        batch_size=batch_size, batch_format="numpy", concurrency=concurrency, num_cpus=num_cpus,
                        num_gpus=num_gpus)
    ds.context.execution_options.preserve_order = True  # same source, same shards
    extra: dict[str, Any] = {
        "kind": "latents", "field": "latent.npy", "dtype": "float32",
        "num_classes": int(manifest.get("num_classes", 0)), "latent_scale": latent_scale, "vae": str(vae_dir),
        "posterior": posterior, "source": str(src) if storage.is_remote(src) else str(Path(src).resolve()),
        "image_size": size or manifest.get("shape", [0, 0, 0])[-1], "encoder": "AutoencoderKL",
    }
    for key in ("classes", "split"):
        if key in manifest:
            extra[key] = manifest[key]
    writer = ShardSetWriter(out, samples_per_shard, extra)
    count = 0
    for batch in numpy_batches(ds):
        for key, latent, label in zip(batch["__key__"], batch["latent"], batch["cls"]):
            sample: dict[str, Any] = {"latent.npy": np.asarray(latent, np.float32)}
            if int(label) >= 0:
                sample["cls"] = int(label)
            writer.write(str(key), sample)
            count += 1
        extra["shape"] = list(batch["latent"].shape[1:])
    if not count:
        raise DataError(f"shard set {src} gave no samples to encode")
    writer.extra = extra
    return writer.close()


def encode_tree(src: str | Path, out: str | Path, vae_dir: str | Path, **kw: Any) -> dict[str, dict[str, Any]]:
    """Encode a shard set, or every shard set one level below ``src`` (e.g. ``train/`` and ``val/``); local
    directories or URLs (``s3://...``) alike."""
    src, out = str(src), str(out)
    if storage.exists(storage.join(src, MANIFEST)):
        return {storage.basename(src): encode_shard_set(src, out, vae_dir, **kw)}
    subsets = [p for p in storage.subfolders(src) if storage.exists(storage.join(p, MANIFEST))]
    if not subsets:
        raise DataError(f"no shard set at {src}: no {MANIFEST} there or in its sub-folders")
    return {storage.basename(p): encode_shard_set(p, storage.join(out, storage.basename(p)), vae_dir, **kw)
            for p in subsets}
