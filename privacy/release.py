"""The noisy release: the only reader of a sensitive shard set.

For every sensitive image ``x`` (pixels in [-1, 1], CHW) the release writes one noisy copy ``y = x + s eps`` with
``eps`` from the keyed PRF of :mod:`privacy.noise` (secret, release-set id, sample key). The release set id is
random per release, so two releases never share noise; and a set that already has a release may only be released
again *derived* from it at a higher level, ``y2 = y1 + sqrt(s2^2 - s1^2) eps'`` (eps' independent): then y2 holds
nothing y1 did not. A lower (or equal) level, or a second independent release, is refused.

The fence (what never leaves the sensitive directory): the secret when generated (:mod:`privacy.secret`), and the
ledger record (:mod:`privacy.ledger`) mapping the release's random public keys back to the sensitive keys. Noisy
copies are written in a random order under random keys; labels only when declared non-sensitive.

The clean subset is either a separate public shard set (``clean_from``) copied as is, or the sensitive samples named
in a consent list file (one sensitive key per line). Consented samples go to the clean subset instead of the noisy
one. More than ``max_clean_fraction`` (default 10%) consented is refused unless ``allow_large_clean_fraction``
(recorded in ``release.json``).

Output layout::

    OUT/noisy/   shards + manifest.json (kind "noisy_pixels": float CHW image.npy, noise_std s)
    OUT/clean/   shards + manifest.json (kind "pixels": uint8 HWC image.npy), absent when there is no clean subset
    OUT/release.json   release id, levels, counts, consent settings; no sensitive path, key or hash, no secret
"""
from __future__ import annotations

import json
import math
import os
import secrets as _secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privacy import ledger
from privacy.boundary import check_readable, fence_of, is_sensitive
from privacy.noise import extra_std, sample_noise
from privacy.secret import MIN_BITS, load_or_create

RELEASE_MANIFEST = "release.json"
NOISY_KIND = "noisy_pixels"
FORMAT = "flowrail-release/2"
DEFAULT_MAX_CLEAN_FRACTION = 0.10


@dataclass
class ReleaseResult:
    out_dir: Path
    manifest: dict[str, Any]
    secret_path: Path
    secret_created: bool

    @property
    def noisy_dir(self) -> Path:
        return self.out_dir / "noisy"

    @property
    def clean_dir(self) -> Path | None:
        return self.out_dir / "clean" if self.manifest["counts"]["clean"] else None


def to_signed_chw(image: np.ndarray) -> np.ndarray:
    """uint8 HWC in 0..255 -> float64 CHW in [-1, 1] (the streaming decoder's ``x = u8 / 127.5 - 1``)."""
    return np.transpose(image.astype(np.float64) / 127.5 - 1.0, (2, 0, 1))


def read_consent_list(path: str | os.PathLike, known: set[str]) -> list[str]:
    """The consented sensitive keys, one per line (``#`` comments); a key not in the set is refused."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"consent list not found: {p}")
    keys = [line.split("#", 1)[0].strip() for line in p.read_text().splitlines()]
    keys = list(dict.fromkeys(k for k in keys if k))
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"consent list {p} names {len(unknown)} key(s) not in the sensitive set (e.g. "
                         f"'{unknown[0]}')")
    if not keys:
        raise ValueError(f"consent list {p} names no key")
    return keys


def _public_key(prefix: str, taken: set[str]) -> str:
    while True:
        key = prefix + _secrets.token_hex(8)
        if key not in taken:
            taken.add(key)
            return key


def _check_level(src: Path, noise_std: float, derive_from: str | os.PathLike | None) -> dict[str, Any] | None:
    """The ledger record to derive from (None for a first release); refuses a second independent release and any
    level not above every earlier one."""
    earlier = ledger.earlier_releases(src)
    if derive_from is None:
        if earlier:
            levels = ", ".join(f"s={r['noise_std']:g}" for r in earlier)
            raise ValueError(f"{src} was already released ({levels}); a second independent release would let noise "
                             f"average out - derive one at a higher level with --derive-from RELEASE_DIR")
        return None
    rid = read_release(derive_from).get("release_id")
    if rid is None:
        raise ValueError(f"{derive_from} is a release of an old format (no release_id) and cannot be derived from")
    record = ledger.read_record(src, rid)
    top = max(r["noise_std"] for r in earlier)
    if not noise_std > top:
        raise ValueError(f"--noise-std {noise_std:g} is not above the earlier release level s={top:g} of {src}; "
                         f"a lower-level release would undo the earlier noise")
    return record


def release(sensitive_dir: str | os.PathLike, out_dir: str | os.PathLike, noise_std: float, *,
            secret: bytes | None = None, secret_file: str | os.PathLike | None = None,
            clean_from: str | os.PathLike | None = None, consent_list: str | os.PathLike | None = None,
            max_clean_fraction: float = DEFAULT_MAX_CLEAN_FRACTION, allow_large_clean_fraction: bool = False,
            derive_from: str | os.PathLike | None = None, release_labels: bool = False,
            dtype: str = "float16", samples_per_shard: int = 1000) -> ReleaseResult:
    """Write the noisy release of ``sensitive_dir`` (and the clean subset) into ``out_dir``.

    ``secret`` (bytes, >= 128 bits) is for tests and library callers; otherwise ``secret_file`` or the fence's
    generated secret. Every check runs before anything is written.
    """
    from pipeline.data.shards import ShardSetWriter, iter_samples, read_manifest

    if not (noise_std > 0 and math.isfinite(noise_std)):
        raise ValueError(f"--noise-std {noise_std} must be a positive finite number")
    if clean_from is not None and consent_list is not None:
        raise ValueError("pass either --clean-from DIR or --consent-list FILE, not both")
    if derive_from is not None and (clean_from is not None or consent_list is not None):
        raise ValueError("--derive-from keeps the earlier release's clean subset; drop --clean-from/--consent-list")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"--dtype {dtype} must be float16 or float32")
    if secret is not None and len(secret) * 8 < MIN_BITS:
        raise ValueError(f"the secret holds {len(secret) * 8} bits; at least {MIN_BITS} random bits are needed")
    src = Path(sensitive_dir)
    manifest = read_manifest(src)
    if not is_sensitive(manifest):
        raise ValueError(f"{src} is not marked sensitive; run `flowrail privacy mark {src}` first")
    check_readable(src, job="privacy release", allow_sensitive=True)
    if manifest.get("kind", "pixels") != "pixels":
        raise ValueError(f"{src} holds {manifest.get('kind')}; the release adds noise in pixel scale and needs a "
                         f"pixel shard set (uint8 images)")
    out = Path(out_dir)
    if fence_of(out) is not None:
        raise ValueError(f"--out {out} lies inside the sensitive set {fence_of(out)}; a release must be outside it")
    if (out / RELEASE_MANIFEST).exists():
        raise ValueError(f"{out} already holds a release ({RELEASE_MANIFEST}); choose a new --out")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; choose a new directory")
    source = _check_level(src, noise_std, derive_from)
    if secret is None:
        secret, secret_path, created = load_or_create(src, secret_file, out, create=False)
    else:
        secret_path, created = Path("<given>"), False

    channels, height, width = manifest["shape"]
    field = manifest.get("field", "image.npy")
    keys = [key for key, _ in iter_samples(src)]
    consented: list[str] = read_consent_list(consent_list, set(keys)) if consent_list is not None else []
    fraction = len(consented) / len(keys)
    if fraction > max_clean_fraction and not allow_large_clean_fraction:
        raise ValueError(f"consent list names {len(consented)} of {len(keys)} samples ({fraction:.1%}), above the "
                         f"{max_clean_fraction:.0%} cap; pass --allow-large-clean-fraction to release them in the clear")
    public_manifest: dict[str, Any] | None = None
    if clean_from is not None:
        check_readable(clean_from, job="privacy release (clean source)")
        public_manifest = read_manifest(clean_from)
        if list(public_manifest["shape"]) != [channels, height, width]:
            raise ValueError(f"clean source {clean_from} holds images of shape {public_manifest['shape']}, the "
                             f"sensitive set {[channels, height, width]}")

    # ---- every check passed: write ----
    if created:
        secret, secret_path, created = load_or_create(src, None, out, create=True)
    labels_out = bool(source["labels_released"]) if source is not None else release_labels
    release_id = _secrets.token_hex(16)
    taken: set[str] = set()
    key_map: dict[str, str] = {}
    consent_map: dict[str, str] = dict(source["consented"]) if source is not None else {}
    common = {"num_classes": manifest.get("num_classes", 0) if labels_out else 0, "shape": [channels, height, width]}
    out.mkdir(parents=True, exist_ok=True)
    noisy = ShardSetWriter(out / "noisy", samples_per_shard, {
        **common, "kind": NOISY_KIND, "field": "image.npy", "dtype": dtype, "noise_std": noise_std,
        "release": "noisy", "pixel_scale": "[-1, 1] + noise"})
    order = np.random.default_rng(_secrets.randbits(64))

    if source is None:
        consent_set = set(consented)
        items = []
        for key, sample in iter_samples(src):
            image = np.asarray(sample[field])
            items.append((key, image, int(sample.get("cls", -1))))
        clean = None
        if consented or clean_from is not None:
            clean = ShardSetWriter(out / "clean", samples_per_shard, {
                **common, "kind": "pixels", "field": "image.npy", "dtype": "uint8", "release": "clean",
                "consent": "consent list" if consented else "separate public source"})
        for i in order.permutation(len(items)):
            key, image, label = items[i]
            label = label if labels_out else -1
            if key in consent_set:
                assert clean is not None
                pkey = _public_key("c", taken)
                consent_map[pkey] = key
                clean.write(pkey, {"image.npy": image, "cls": label})
                continue
            pkey = _public_key("n", taken)
            key_map[pkey] = key
            x = to_signed_chw(image)
            y = (x + noise_std * sample_noise(secret, release_id, key, x.shape)).astype(dtype)
            noisy.write(pkey, {"image.npy": y, "cls": label})
        if clean_from is not None and public_manifest is not None:
            assert clean is not None
            pfield = public_manifest.get("field", "image.npy")
            for key, sample in iter_samples(Path(clean_from)):
                clean.write(f"public-{key}", {"image.npy": np.asarray(sample[pfield]),
                                              "cls": int(sample.get("cls", -1)) if labels_out else -1})
        clean_manifest = clean.close() if clean is not None else None
    else:
        s1 = float(source["noise_std"])
        add = extra_std(s1, noise_std)
        earlier = Path(derive_from)  # type: ignore[arg-type]
        items = [(k, np.asarray(sm["image.npy"]).astype(np.float64), int(sm.get("cls", -1)))
                 for k, sm in iter_samples(earlier / "noisy")]
        for i in order.permutation(len(items)):
            k1, y1, label = items[i]
            key = source["keys"][k1]
            pkey = _public_key("n", taken)
            key_map[pkey] = key
            y2 = (y1 + add * sample_noise(secret, release_id, key, y1.shape)).astype(dtype)
            noisy.write(pkey, {"image.npy": y2, "cls": label})
        clean_manifest = None
        if (earlier / "clean" / "manifest.json").is_file():
            shutil.copytree(earlier / "clean", out / "clean")
            clean_manifest = read_manifest(out / "clean")
    noisy_manifest = noisy.close()

    created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    n_public = (clean_manifest["num_samples"] if clean_manifest else 0) - len(consent_map)
    record = {
        "format": FORMAT, "release_id": release_id, "created": created_at, "noise_std": noise_std,
        "pixel_scale": "[-1, 1]", "noise_dtype": dtype, "noise": "hmac-sha256(secret, release_id, key) -> philox",
        "derived_from": ({"release_id": source["release_id"], "noise_std": source["noise_std"],
                          "extra_std": extra_std(float(source["noise_std"]), noise_std)} if source else None),
        "counts": {"noisy": noisy_manifest["num_samples"],
                   "clean": clean_manifest["num_samples"] if clean_manifest else 0,
                   "consented": len(consent_map), "public_clean": n_public},
        "clean_mode": "consent_list" if consent_map else ("public" if clean_from is not None else "none"),
        "consent": {"fraction": len(consent_map) / max(1, len(consent_map) + noisy_manifest["num_samples"]),
                    "cap": max_clean_fraction, "allow_large_clean_fraction": allow_large_clean_fraction},
        "labels": "released" if labels_out else "withheld",
    }
    (out / RELEASE_MANIFEST).write_text(json.dumps(record, indent=2))
    ledger.write_record(src, {"release_id": release_id, "created": created_at, "noise_std": noise_std,
                              "derived_from": source["release_id"] if source else None, "out": str(out.resolve()),
                              "labels_released": labels_out, "keys": key_map, "consented": consent_map})
    return ReleaseResult(out, record, secret_path, created)


def read_release(release_dir: str | os.PathLike) -> dict[str, Any]:
    """The release manifest of a release directory (a clear error when it is not one)."""
    path = Path(release_dir) / RELEASE_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{release_dir} is not a privacy release: {RELEASE_MANIFEST} not found "
                                f"(make one with `flowrail privacy release`)")
    return json.loads(path.read_text())
