"""Pre-encoding for FLUX fine-tuning: image + caption shards -> autoencoder latents + text embeddings (Ray Data).

Per sample (REFERENCE.md section 9):

- ``latent.npy``  (16, S/f, S/f) float32: ``(E(x) - shift_factor) * scaling_factor`` with ``E`` the autoencoder's
  posterior mode, ``x`` the image resized (shorter side) and centre-cropped to S x S, in [-1, 1];
- ``t5.npy``      (L, D_t5): T5 encoder last hidden states of the caption padded/truncated to L tokens;
- ``clip_pooled.npy`` (D_clip,): CLIP text model pooled output (77 tokens);
- ``txt``: the caption.

Encoders load from local folders only, in the diffusers FLUX pipeline layout (``vae/``, ``text_encoder/`` +
``tokenizer/`` for CLIP, ``text_encoder_2/`` + ``tokenizer_2/`` for T5). Encoding runs in Ray Data actors
(``map_batches`` with a callable class on an actor pool of ``concurrency`` actors); the driver writes the shards with
:class:`pipeline.data.shards.ShardSetWriter`. Captions: a ``txt``/``text``/``caption`` member, else the class name
(manifest ``classes[cls]``), else the class index.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.safe_decode import numpy_batches, safe_decode
from pipeline.data.shards import ShardSetWriter, read_manifest, shard_paths
from pipeline.errors import DataError
from pipeline.flux.packing import denormalize_latents, normalize_latents

CAPTION_FIELDS = ("txt", "text", "caption")
IMAGE_FIELDS = ("image.npy", "jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class EncoderPaths:
    """Local folders of the autoencoder, the CLIP and T5 text encoders and their tokenizers."""

    vae: str
    clip: str
    clip_tokenizer: str
    t5: str
    t5_tokenizer: str

    @classmethod
    def from_pipeline(cls, root: str | Path) -> "EncoderPaths":
        """The components of a local diffusers FLUX pipeline folder."""
        root = Path(root)
        paths = cls(vae=str(root / "vae"), clip=str(root / "text_encoder"), clip_tokenizer=str(root / "tokenizer"),
                    t5=str(root / "text_encoder_2"), t5_tokenizer=str(root / "tokenizer_2"))
        paths.check()
        return paths

    def check(self) -> None:
        for name, folder in asdict(self).items():
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"FLUX {name} folder {folder} does not exist")


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu"):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(device).eval()
    if vae.config.latent_channels != 16:
        raise ValueError(f"autoencoder {path} has {vae.config.latent_channels} latent channels; FLUX needs 16")
    return vae


def autoencoder_factors(vae) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)`` from the autoencoder's config (shift 0 when absent)."""
    return float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """FLUX model-space latents (B, 16, h, w) -> images in [-1, 1] (B, 3, H, W)."""
    shift, scale = autoencoder_factors(vae)
    z = denormalize_latents(latents, shift, scale).to(vae.device, vae.dtype)
    return vae.decode(z).sample.float().clamp(-1, 1)


def _to_rgb(value: Any, size: int) -> np.ndarray:
    """An image (HWC/HW array or encoded bytes) -> uint8 (size, size, 3), shorter side resized, centre-cropped."""
    from PIL import Image

    if isinstance(value, (bytes, bytearray)):
        img = Image.open(io.BytesIO(value))
    else:
        arr = np.asarray(value)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        img = Image.fromarray(arr.astype(np.uint8))
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


class FluxEncoder:
    """Ray Data actor: a numpy batch of raw samples -> ``__key__``, ``latent``, ``t5``, ``clip_pooled``, ``caption``."""

    def __init__(self, paths: dict[str, str], size: int, t5_max_length: int = 512, clip_max_length: int = 77,
                 classes: list[str] | None = None, device: str = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        p = EncoderPaths(**paths)
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.vae = load_autoencoder(p.vae, self.device)
        self.shift, self.scale = autoencoder_factors(self.vae)
        load = dict(local_files_only=True, dtype=self.dtype)
        self.clip = CLIPTextModel.from_pretrained(p.clip, **load).to(self.device).eval()
        self.t5 = T5EncoderModel.from_pretrained(p.t5, **load).to(self.device).eval()
        self.clip_tok = AutoTokenizer.from_pretrained(p.clip_tokenizer, local_files_only=True)
        self.t5_tok = AutoTokenizer.from_pretrained(p.t5_tokenizer, local_files_only=True)
        self.size, self.t5_len, self.clip_len, self.classes = size, t5_max_length, clip_max_length, classes

    def _captions(self, batch: dict[str, np.ndarray], keys: list[str]) -> list[str]:
        for name in CAPTION_FIELDS:
            if name in batch:
                return [str(c) for c in batch[name]]
        if "cls" in batch:
            return [self.classes[int(c)] if self.classes else str(int(c)) for c in batch["cls"]]
        raise DataError(f"sample {keys[0]} has no caption (expected a member {'/'.join(CAPTION_FIELDS)} or cls)")

    def _images(self, batch: dict[str, np.ndarray], keys: list[str]) -> torch.Tensor:
        field = next((f for f in IMAGE_FIELDS if f in batch), None)
        if field is None:
            raise DataError(f"sample {keys[0]} has no image (expected one of {', '.join(IMAGE_FIELDS)})")
        pixels = np.stack([_to_rgb(v, self.size) for v in batch[field]])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["__key__"]]
        captions = self._captions(batch, keys)
        x = self._images(batch, keys).to(self.device, self.vae.dtype)
        latent = normalize_latents(self.vae.encode(x).latent_dist.mode().float(), self.shift, self.scale)
        t5_ids = self.t5_tok(captions, padding="max_length", max_length=self.t5_len, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        clip_ids = self.clip_tok(captions, padding="max_length", max_length=self.clip_len, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
        t5 = self.t5(t5_ids).last_hidden_state.float()
        pooled = self.clip(clip_ids).pooler_output.float()
        return {"__key__": np.asarray(keys), "latent": latent.cpu().numpy(), "t5": t5.cpu().numpy(),
                "clip_pooled": pooled.cpu().numpy(), "caption": np.asarray(captions)}


def source_shards(src: str | Path) -> tuple[list[str], dict[str, Any]]:
    """Tar paths of a flowrail shard set (with manifest) or of a plain directory of WebDataset ``*.tar`` files."""
    path = Path(src)
    if (path / "manifest.json").is_file():
        manifest = read_manifest(path)
        return shard_paths(path, manifest), manifest
    from pipeline.data.fence import check_path

    tars = sorted(str(check_path(p, "flux_encode")) for p in path.glob("*.tar")) if path.is_dir() else []
    if not tars:
        raise DataError(f"no shards at {src}: expected a flowrail shard set or a directory of .tar files")
    return tars, {}


def encode_shards(src: str | Path, out: str | Path, paths: EncoderPaths, *, size: int, t5_max_length: int = 512,
                  batch_size: int = 8, concurrency: int = 1, num_cpus: float = 1, num_gpus: float = 0,
                  samples_per_shard: int = 1000) -> dict[str, Any]:
    """Encode the shard set ``src`` into a FLUX latent shard set at ``out``; returns its manifest."""
    import ray

    if size % 16:
        raise ValueError(f"size={size} must be a multiple of 16 (8x autoencoder x 2x2 packing for FLUX.1)")
    paths.check()
    from pipeline.data.fence import check_readable

    check_readable(str(src), job="flux_encode")  # the path, its links and its manifest's shards, before any read
    tars, manifest = source_shards(src)
    check_readable(manifest or str(src), job="flux_encode")
    device = "cuda" if num_gpus > 0 else "cpu"
    ds = ray.data.read_webdataset(tars, decoder=safe_decode)  # never unpickles (pipeline.data.safe_decode)
    ds = ds.map_batches(FluxEncoder, fn_constructor_kwargs=dict(paths=asdict(paths), size=size,
                                                               t5_max_length=t5_max_length,
                                                               classes=manifest.get("classes"), device=device),
                        batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
                        compute=ray.data.ActorPoolStrategy(size=concurrency),
                        num_gpus=num_gpus)
    from diffusers import AutoencoderKL

    vae_config = AutoencoderKL.load_config(paths.vae, local_files_only=True)
    extra: dict[str, Any] = {"kind": "latents", "field": "latent.npy", "dtype": "float32", "num_classes": 0,
                             "vae": paths.vae, "shift_factor": float(vae_config.get("shift_factor") or 0.0),
                             "latent_scale": float(vae_config["scaling_factor"]), "source": str(src),
                             "image_size": size, "encoder": "flux"}
    writer = ShardSetWriter(Path(out), samples_per_shard, extra)
    count = 0
    for batch in numpy_batches(ds):
        for i, key in enumerate(batch["__key__"]):
            writer.write(str(key), {"latent.npy": batch["latent"][i].astype(np.float32),
                                    "t5.npy": batch["t5"][i].astype(np.float32),
                                    "clip_pooled.npy": batch["clip_pooled"][i].astype(np.float32),
                                    "txt": str(batch["caption"][i])})
            count += 1
        extra["shape"] = list(batch["latent"].shape[1:])
        extra["cond_fields"] = {"t5.npy": list(batch["t5"].shape[1:]),
                                "clip_pooled.npy": list(batch["clip_pooled"].shape[1:])}
    if not count:
        raise DataError(f"shard set {src} gave no samples to encode")
    writer.extra = extra
    return writer.close()
