"""The noisy release: the only reader of a sensitive shard set.

For every sensitive image ``x`` (pixels in [-1, 1], CHW) the release writes one noisy copy ``y = x + s eps``,
``eps ~ N(0, I)``, drawn once from a generator seeded by ``(secret, sha256(key))``: re-running the release gives the
same noise (a fresh draw per release would let averaging undo it), and the secret never leaves this module — it is
not written to any manifest, shard or log.

The clean subset is either a separate public/consented shard set (``clean_from``) copied as is, or — for experiments
— a fraction of the sensitive set declared consented (``clean_fraction``). Consented samples go to the clean subset
and are left out of the noisy set, so the two are disjoint, as in SFBD's setting of a small clean set beside the
noisy one.

Output layout::

    OUT/noisy/   shards + manifest.json (kind "noisy_pixels": float CHW image.npy, noise_std s)
    OUT/clean/   shards + manifest.json (kind "pixels": uint8 HWC image.npy), absent when there is no clean subset
    OUT/release.json   s, counts, shard hashes, sources; no raw data, no seed
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privacy.boundary import check_readable, is_sensitive

SECRET_ENV = "FLOWRAIL_PRIVACY_SECRET"
RELEASE_MANIFEST = "release.json"
NOISY_KIND = "noisy_pixels"


@dataclass
class ReleaseResult:
    out_dir: Path
    manifest: dict[str, Any]

    @property
    def noisy_dir(self) -> Path:
        return self.out_dir / "noisy"

    @property
    def clean_dir(self) -> Path | None:
        return self.out_dir / "clean" if self.manifest["counts"]["clean"] else None


def read_secret(secret_file: str | os.PathLike | None) -> bytes:
    """The secret noise seed, from a file or ``$FLOWRAIL_PRIVACY_SECRET``; never echoed anywhere."""
    if secret_file is not None:
        path = Path(secret_file)
        if not path.is_file():
            raise FileNotFoundError(f"secret seed file not found: {path}")
        secret = path.read_bytes().strip()
        where = str(path)
    else:
        secret = os.environ.get(SECRET_ENV, "").strip().encode()
        where = f"${SECRET_ENV}"
    if not secret:
        raise ValueError(f"no secret noise seed: pass --secret-seed-file PATH or set ${SECRET_ENV} (empty: {where})")
    return secret


def sample_noise(secret: bytes, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The one fixed standard normal draw for sample ``key`` (float64)."""
    secret_int = int.from_bytes(hashlib.sha256(b"flowrail-release\0" + secret).digest(), "big")
    key_int = int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "big")
    return np.random.default_rng(np.random.SeedSequence([secret_int, key_int])).standard_normal(shape)


def to_signed_chw(image: np.ndarray) -> np.ndarray:
    """uint8 HWC in 0..255 -> float64 CHW in [-1, 1] (the streaming decoder's ``x = u8 / 127.5 - 1``)."""
    return np.transpose(image.astype(np.float64) / 127.5 - 1.0, (2, 0, 1))


def _shard_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": s["name"], "num_samples": s["num_samples"], "sha256": s.get("sha256")} for s in manifest["shards"]]


def _choose_consented(keys: list[str], fraction: float, seed: int) -> set[str]:
    n = int(round(fraction * len(keys)))
    if fraction > 0 and n == 0:
        raise ValueError(f"--clean-fraction {fraction} of {len(keys)} samples selects no sample")
    order = np.random.default_rng(seed).permutation(len(keys))
    return {keys[i] for i in order[:n]}


def release(sensitive_dir: str | os.PathLike, out_dir: str | os.PathLike, noise_std: float, secret: bytes, *,
            clean_from: str | os.PathLike | None = None, clean_fraction: float | None = None, clean_seed: int = 0,
            dtype: str = "float16", samples_per_shard: int = 1000) -> ReleaseResult:
    """Write the noisy release of ``sensitive_dir`` (and the clean subset) into ``out_dir``."""
    from pipeline.data.shards import ShardSetWriter, iter_samples, read_manifest

    if not (noise_std > 0 and math.isfinite(noise_std)):
        raise ValueError(f"--noise-std {noise_std} must be a positive finite number")
    if clean_from is not None and clean_fraction is not None:
        raise ValueError("pass either --clean-from DIR or --clean-fraction F, not both")
    if clean_fraction is not None and not 0 <= clean_fraction < 1:
        raise ValueError(f"--clean-fraction {clean_fraction} must be in [0, 1)")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"--dtype {dtype} must be float16 or float32")
    src = Path(sensitive_dir)
    manifest = read_manifest(src)
    if not is_sensitive(manifest):
        raise ValueError(f"{src} is not marked sensitive; run `flowrail privacy mark {src}` first")
    check_readable(src, job="privacy release", allow_sensitive=True)
    if manifest.get("kind", "pixels") != "pixels":
        raise ValueError(f"{src} holds {manifest.get('kind')}; the release adds noise in pixel scale and needs a "
                         f"pixel shard set (uint8 images)")
    out = Path(out_dir)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"--out {out} must lie outside the sensitive set {src}")
    if (out / RELEASE_MANIFEST).exists():
        raise ValueError(f"{out} already holds a release ({RELEASE_MANIFEST}); choose a new --out")

    channels, height, width = manifest["shape"]
    public_manifest: dict[str, Any] | None = None
    if clean_from is not None:
        check_readable(clean_from, job="privacy release (clean source)")
        public_manifest = read_manifest(clean_from)
        if list(public_manifest["shape"]) != [channels, height, width]:
            raise ValueError(f"clean source {clean_from} holds images of shape {public_manifest['shape']}, the "
                             f"sensitive set {[channels, height, width]}")

    keys = [key for key, _ in iter_samples(src)]
    consented = _choose_consented(keys, clean_fraction, clean_seed) if clean_fraction else set()
    common = {"num_classes": manifest.get("num_classes", 0), "shape": [channels, height, width]}
    noisy = ShardSetWriter(out / "noisy", samples_per_shard, {
        **common, "kind": NOISY_KIND, "field": "image.npy", "dtype": dtype, "noise_std": noise_std,
        "release": "noisy", "pixel_scale": "[-1, 1] + noise"})
    clean = None
    if consented or clean_from is not None:
        clean = ShardSetWriter(out / "clean", samples_per_shard, {
            **common, "kind": "pixels", "field": "image.npy", "dtype": "uint8", "release": "clean",
            "consent": "declared fraction of the sensitive set" if consented else "separate public source"})
    field = manifest.get("field", "image.npy")
    for key, sample in iter_samples(src):
        image = np.asarray(sample[field])
        label = sample.get("cls", -1)
        if key in consented:
            assert clean is not None
            clean.write(key, {"image.npy": image, "cls": int(label)})
            continue
        x = to_signed_chw(image)
        y = (x + noise_std * sample_noise(secret, key, x.shape)).astype(dtype)
        noisy.write(key, {"image.npy": y, "cls": int(label)})
    noisy_manifest = noisy.close()

    clean_manifest: dict[str, Any] | None = None
    if clean_from is not None and public_manifest is not None:
        public = Path(clean_from)
        pfield = public_manifest.get("field", "image.npy")
        for key, sample in iter_samples(public):
            assert clean is not None
            clean.write(f"public-{key}", {"image.npy": np.asarray(sample[pfield]), "cls": int(sample.get("cls", -1))})
    if clean is not None:
        clean_manifest = clean.close()

    record = {
        "format": "flowrail-release/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "noise_std": noise_std,
        "pixel_scale": "[-1, 1]",
        "noise_dtype": dtype,
        "counts": {"sensitive": len(keys), "noisy": noisy_manifest["num_samples"],
                   "clean": clean_manifest["num_samples"] if clean_manifest else 0,
                   "clean_from_sensitive": len(consented)},
        "clean_mode": "fraction" if consented else ("public" if clean_from is not None else "none"),
        "clean_fraction": clean_fraction,
        "sensitive_source": {"dir": str(src.resolve()), "num_samples": manifest["num_samples"],
                             "shards": _shard_entries(manifest)},
        "clean_source": str(Path(clean_from).resolve()) if clean_from is not None else None,
        "noisy": {"dir": "noisy", "shards": _shard_entries(noisy_manifest)},
        "clean": {"dir": "clean", "shards": _shard_entries(clean_manifest)} if clean_manifest else None,
    }
    (out / RELEASE_MANIFEST).write_text(json.dumps(record, indent=2))
    return ReleaseResult(out, record)


def read_release(release_dir: str | os.PathLike) -> dict[str, Any]:
    """The release manifest of a release directory (a clear error when it is not one)."""
    path = Path(release_dir) / RELEASE_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{release_dir} is not a privacy release: {RELEASE_MANIFEST} not found "
                                f"(make one with `flowrail privacy release`)")
    return json.loads(path.read_text())
