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

import hashlib
import io
import json
import math
import os
import secrets as _secrets
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.data.fence import check_no_links, check_path, check_readable, fence_of, inside, is_sensitive
from privacy import ledger
from privacy.noise import extra_std, sample_noise
from privacy.secret import check_strength, load_or_create

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


def read_consent_list(path: str | os.PathLike, known: set[str], fence: Path | None = None) -> tuple[list[str], str]:
    """The consented sensitive keys, one per line (``#`` comments), and the list's sha256. The list must lie inside
    the sensitive set's fence ``fence`` (written by the data owner; links resolved); a key not in the set is
    refused."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"consent list not found: {p}")
    if fence is not None:
        where = fence_of(os.path.realpath(p))
        if where is None or os.path.realpath(where) != os.path.realpath(fence):
            raise ValueError(f"consent list {p} lies outside the sensitive set's fence {fence}; the data owner writes "
                             f"it inside (e.g. {Path(fence) / 'consent.txt'})")
    data = Path(os.path.realpath(p)).read_bytes()
    keys = [line.split("#", 1)[0].strip() for line in data.decode().splitlines()]
    keys = list(dict.fromkeys(k for k in keys if k))
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"consent list {p} names {len(unknown)} key(s) not in the sensitive set (e.g. "
                         f"'{unknown[0]}')")
    if not keys:
        raise ValueError(f"consent list {p} names no key")
    return keys, hashlib.sha256(data).hexdigest()


def _public_key(prefix: str, taken: set[str]) -> str:
    while True:
        key = prefix + _secrets.token_hex(8)
        if key not in taken:
            taken.add(key)
            return key


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar_samples(data: bytes, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(key, {field: value})`` of one tar held in memory (already verified by hash; never unpickles)."""
    from pipeline.data.shards import decode_member

    current: str | None = None
    sample: dict[str, Any] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                raise ValueError(f"{where}: member {member.name} is not a plain file")
            key, _, name = member.name.partition(".")
            if current is not None and key != current:
                yield current, sample
                sample = {}
            current = key
            sample[name] = decode_member(name, tar.extractfile(member).read(), key, where)  # type: ignore[union-attr]
    if current is not None:
        yield current, sample


def _verified_source(derive_from: str | os.PathLike) -> tuple[dict[str, Any], list[tuple[str, np.ndarray, int]]]:
    """The ledger's record of the earlier release and its noisy copies ``(public key, y1, label)``.

    The earlier release is identified by its recorded id; every file read from it (``release.json``, the noisy
    manifest and shards) is read once into memory and must match the sha256 the ledger recorded when it was
    committed. A link anywhere in the directory, a path into a fence, an unknown id or a changed file is refused."""
    d = Path(derive_from)
    check_path(d, "privacy release (--derive-from)")
    if not (d / RELEASE_MANIFEST).is_file():
        raise FileNotFoundError(f"--derive-from {d} is not a privacy release: {RELEASE_MANIFEST} not found")
    check_no_links(d, "--derive-from release")
    rid = json.loads((d / RELEASE_MANIFEST).read_bytes()).get("release_id")
    if not isinstance(rid, str):
        raise ValueError(f"--derive-from {d}: {RELEASE_MANIFEST} holds no release_id (an old format or not a release)")
    record = ledger.read_record(None, rid)
    files = record.get("files")
    if not files:
        raise ValueError(f"--derive-from {d}: release {rid} has no recorded file hashes and cannot be derived from")
    verified: dict[str, bytes] = {}
    for rel, sha in files.items():
        if not (rel == RELEASE_MANIFEST or rel.startswith("noisy/")):
            continue
        path = d / rel
        if not path.is_file():
            raise ValueError(f"--derive-from {d}: {rel} of release {rid} is missing")
        data = check_path(path, "privacy release (--derive-from)").read_bytes()
        if _sha(data) != sha:
            raise ValueError(f"--derive-from {d}: {rel} differs from what the ledger recorded for release {rid}; "
                             f"refused")
        verified[rel] = data
    noisy_manifest = json.loads(verified["noisy/manifest.json"])
    items = []
    for entry in noisy_manifest["shards"]:
        rel = f"noisy/{entry['name']}"
        if rel not in verified:
            raise ValueError(f"--derive-from {d}: shard {rel} is not one the ledger recorded for release {rid}")
        for key, sample in _tar_samples(verified[rel], str(d / rel)):
            items.append((key, np.asarray(sample["image.npy"]).astype(np.float64), int(sample.get("cls", -1))))
    return record, items


def _read_sensitive(src: Path, field: str) -> list[tuple[str, np.ndarray, int]]:
    """Every ``(key, uint8 HWC image, label)`` of the sensitive set (read inside its fence)."""
    from pipeline.data.shards import iter_samples

    with inside(src):
        return [(key, np.asarray(sample[field]), int(sample.get("cls", -1))) for key, sample in iter_samples(src)]


def _files_of(out: Path) -> dict[str, str]:
    """sha256 of every file of a finished release, by its path relative to the release."""
    return {p.relative_to(out).as_posix(): _sha(p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}


def _level_check(hashes: set[str], noise_std: float, source: dict[str, Any] | None, src: Path) -> None:
    """Refuse a second independent release of any of these images, and any level not above every earlier one."""
    earlier = ledger.overlapping(hashes)
    earlier += [{**r, "image_hashes": sorted(hashes)} for r in ledger.legacy_records(src)]  # older per-set ledger
    if source is None:
        if earlier:
            shared = len(hashes & set().union(*(r["image_hashes"] for r in earlier)))
            levels = ", ".join(f"{r['release_id'][:8]} s={r['noise_std']:g}" for r in earlier)
            raise ValueError(f"{shared} of the {len(hashes)} images of {src} were already released ({levels}); a "
                             f"second independent release would let noise average out - derive one at a higher "
                             f"level with --derive-from RELEASE_DIR")
        return
    top = max(r["noise_std"] for r in earlier) if earlier else source["noise_std"]
    if not noise_std > top:
        raise ValueError(f"--noise-std {noise_std:g} is not above the earlier release level s={top:g} of these "
                         f"images; a lower-level release would undo the earlier noise")


def release(sensitive_dir: str | os.PathLike, out_dir: str | os.PathLike, noise_std: float, *,
            secret: bytes | None = None, secret_file: str | os.PathLike | None = None,
            clean_from: str | os.PathLike | None = None, consent_list: str | os.PathLike | None = None,
            max_clean_fraction: float = DEFAULT_MAX_CLEAN_FRACTION, allow_large_clean_fraction: bool = False,
            derive_from: str | os.PathLike | None = None, release_labels: bool = False,
            dtype: str = "float16", samples_per_shard: int = 1000) -> ReleaseResult:
    """Write the noisy release of ``sensitive_dir`` (and the clean subset) into ``out_dir``.

    ``secret`` (bytes, >= 128 bits, not guessable) is for tests and library callers; otherwise ``secret_file`` or
    the fence's generated secret. Every check runs before anything is written; the release is reserved in the
    ledger before its first byte and committed after its last (:mod:`privacy.ledger`).
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
    if secret is not None:
        check_strength(secret, "the secret")
    src = Path(sensitive_dir)
    with inside(src):
        manifest = read_manifest(src)
    if not is_sensitive(manifest):
        raise ValueError(f"{src} is not marked sensitive; run `flowrail privacy mark {src}` first")
    check_no_links(src, "sensitive set")
    if manifest.get("kind", "pixels") != "pixels":
        raise ValueError(f"{src} holds {manifest.get('kind')}; the release adds noise in pixel scale and needs a "
                         f"pixel shard set (uint8 images)")
    out = Path(out_dir)
    if fence_of(out) is not None:
        raise ValueError(f"--out {out} lies inside the sensitive set {fence_of(out)}; a release must be outside it")
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link; choose a plain new directory")
    if (out / RELEASE_MANIFEST).exists():
        raise ValueError(f"{out} already holds a release ({RELEASE_MANIFEST}); choose a new --out")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; choose a new directory")
    ledger.check_no_pending()
    source, earlier_items = _verified_source(derive_from) if derive_from is not None else (None, [])
    if secret is None:
        secret, secret_path, created = load_or_create(src, secret_file, out, create=False)
    else:
        secret_path, created = Path("<given>"), False

    channels, height, width = manifest["shape"]
    field = manifest.get("field", "image.npy")
    items = _read_sensitive(src, field)
    keys = [key for key, _, _ in items]
    hash_of = {key: ledger.image_hash(image) for key, image, _ in items}
    consent_sha = None
    consented: list[str] = []
    if consent_list is not None:
        consented, consent_sha = read_consent_list(consent_list, set(keys), src)
    fraction = len(consented) / len(keys)
    if fraction > max_clean_fraction and not allow_large_clean_fraction:
        raise ValueError(f"consent list names {len(consented)} of {len(keys)} samples ({fraction:.1%}), above the "
                         f"{max_clean_fraction:.0%} cap; pass --allow-large-clean-fraction to release them in the clear")
    public_manifest: dict[str, Any] | None = None
    public_sha = None
    if clean_from is not None:
        check_readable(clean_from, job="privacy release (clean source)")
        public_manifest = read_manifest(clean_from)
        public_sha = _sha(check_path(Path(clean_from) / "manifest.json").read_bytes())
        if list(public_manifest["shape"]) != [channels, height, width]:
            raise ValueError(f"clean source {clean_from} holds images of shape {public_manifest['shape']}, the "
                             f"sensitive set {[channels, height, width]}")
    if source is not None:
        by_key = dict(hash_of)
        wrong = [k for k, h in source["images"].items() if by_key.get(k) != h]
        if wrong:
            raise ValueError(f"--derive-from: release {source['release_id']} was made from other images than {src} "
                             f"holds (e.g. its key '{wrong[0]}'); derive from a release of this set")
        consent_sha = source.get("consent_sha256")
    hashes = set(hash_of.values()) if source is None else set(source["images"].values())
    _level_check(hashes, noise_std, source, src)

    # ---- every check passed: reserve in the ledger, then write ----
    if created:
        secret, secret_path, created = load_or_create(src, None, out, create=True)
    labels_out = bool(source["labels_released"]) if source is not None else release_labels
    release_id = _secrets.token_hex(16)
    created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    images = {k: hash_of[k] for k in keys} if source is None else dict(source["images"])
    public_key = ledger.public_key_hex()
    ledger.reserve({"release_id": release_id, "created": created_at, "noise_std": noise_std,
                    "derived_from": source["release_id"] if source else None, "out": str(out.resolve()),
                    "sensitive": str(src.resolve()), "images": images, "image_hashes": sorted(set(images.values())),
                    "labels_released": labels_out, "consent_sha256": consent_sha,
                    "clean_public": ({"path": str(Path(clean_from).resolve()), "manifest_sha256": public_sha}
                                     if clean_from is not None else (source or {}).get("clean_public"))},
                   check=lambda: _level_check(hashes, noise_std, source, src))
    taken: set[str] = set()
    key_map: dict[str, str] = {}
    consent_map: dict[str, str] = dict(source["consented"]) if source is not None else {}
    common = {"num_classes": manifest.get("num_classes", 0) if labels_out else 0, "shape": [channels, height, width]}
    out.mkdir(parents=True, exist_ok=True)
    noisy = ShardSetWriter(out / "noisy", samples_per_shard, {
        **common, "kind": NOISY_KIND, "field": "image.npy", "dtype": dtype, "noise_std": noise_std,
        "release": "noisy", "pixel_scale": "[-1, 1] + noise"})
    order = np.random.default_rng(_secrets.randbits(64))
    clean_public = {"path": str(Path(clean_from).resolve()), "manifest_sha256": public_sha} if clean_from else None
    if source is not None:
        clean_public = source.get("clean_public")
    by_key = {key: (image, label) for key, image, label in items}
    clean = None
    if consent_map or consented or clean_public:
        clean = ShardSetWriter(out / "clean", samples_per_shard, {
            **common, "kind": "pixels", "field": "image.npy", "dtype": "uint8", "release": "clean",
            "consent": "consent list" if (consented or consent_map) else "separate public source"})

    if source is None:
        consent_set = set(consented)
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
    else:
        add = extra_std(float(source["noise_std"]), noise_std)
        for i in order.permutation(len(earlier_items)):
            k1, y1, label = earlier_items[i]
            key = source["keys"][k1]
            pkey = _public_key("n", taken)
            key_map[pkey] = key
            y2 = (y1 + add * sample_noise(secret, release_id, key, y1.shape)).astype(dtype)
            noisy.write(pkey, {"image.npy": y2, "cls": label})
        for pkey, key in sorted(consent_map.items()):  # re-copied from the consented originals, inside the fence
            assert clean is not None
            image, label = by_key[key]
            clean.write(pkey, {"image.npy": image, "cls": label if labels_out else -1})
    if clean_public is not None:
        assert clean is not None
        pdir = Path(clean_public["path"])
        check_readable(pdir, job="privacy release (clean source)")
        if _sha(check_path(pdir / "manifest.json").read_bytes()) != clean_public["manifest_sha256"]:
            raise ValueError(f"clean source {pdir} changed since it was recorded")
        pfield = read_manifest(pdir).get("field", "image.npy")
        for key, sample in iter_samples(pdir):
            clean.write(f"public-{key}", {"image.npy": np.asarray(sample[pfield]),
                                          "cls": int(sample.get("cls", -1)) if labels_out else -1})
    clean_manifest = clean.close() if clean is not None else None
    noisy_manifest = noisy.close()

    n_public = (clean_manifest["num_samples"] if clean_manifest else 0) - len(consent_map)
    record = {
        "format": FORMAT, "release_id": release_id, "created": created_at, "noise_std": noise_std,
        "pixel_scale": "[-1, 1]", "noise_dtype": dtype, "noise": "hmac-sha256(secret, release_id, key) -> philox",
        "derived_from": ({"release_id": source["release_id"], "noise_std": source["noise_std"],
                          "extra_std": extra_std(float(source["noise_std"]), noise_std)} if source else None),
        "counts": {"noisy": noisy_manifest["num_samples"],
                   "clean": clean_manifest["num_samples"] if clean_manifest else 0,
                   "consented": len(consent_map), "public_clean": n_public},
        "clean_mode": "consent_list" if consent_map else ("public" if clean_public else "none"),
        "consent": {"fraction": len(consent_map) / max(1, len(consent_map) + noisy_manifest["num_samples"]),
                    "cap": max_clean_fraction, "allow_large_clean_fraction": allow_large_clean_fraction,
                    "list_sha256": consent_sha},
        "labels": "released" if labels_out else "withheld",
        "audit_public_key": public_key,
    }
    (out / RELEASE_MANIFEST).write_text(json.dumps(record, indent=2))
    ledger.commit(release_id, {"keys": key_map, "consented": consent_map, "files": _files_of(out),
                               "audit_public_key": public_key})
    return ReleaseResult(out, record, secret_path, created)


def read_release(release_dir: str | os.PathLike) -> dict[str, Any]:
    """The release manifest of a release directory (a clear error when it is not one)."""
    path = Path(release_dir) / RELEASE_MANIFEST
    check_path(path, "read release")  # a release directory never lies in (or links into) a fence
    if not path.is_file():
        raise FileNotFoundError(f"{release_dir} is not a privacy release: {RELEASE_MANIFEST} not found "
                                f"(make one with `flowrail privacy release`)")
    return json.loads(path.read_text())
