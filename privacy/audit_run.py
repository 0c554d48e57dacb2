"""``flowrail privacy audit``: memorization statistics of a trained checkpoint, its pass/fail, logged to MLflow.

1. Generated samples (labels in the sensitive set's proportions, or unconditional when the release withheld labels)
   against the sensitive set, reported separately for the *released* images (noisy copies only) and the *consented*
   ones (given in the clear): Carlini extraction (fraction, its 95% upper bound, the ratio's quantiles and
   histogram), nearest-neighbour l2, max cosine similarity (:mod:`privacy.audit`).
2. Beside them, the floors: the real-vs-real nearest-neighbour distance of the released images and, with the release,
   the noisy copies' own re-identification and extraction rates (what the release alone already reveals).
3. With the release: the checkpoint's model denoises the noisy copies (from ``t*``, as SFBD does), and the
   reconstructions are compared with their own originals - how much a model holder could recover.

The criterion (:func:`criterion`) decides the pass that :mod:`privacy.gate` checks before a sample grid is logged or
the checkpoint registered. Reads the sensitive set and the fence's key map inside the boundary; writes only
statistics (MLflow metrics, ``privacy_audit.json`` in the checkpoint).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from privacy.audit import (Features, audit_reconstructions, audit_samples, carlini_extraction, nn_floor,
                           ratio_histogram, samples_for_zero_bound, split_extraction, _quantiles,
                           normalized_l2, unit_pixels)
from pipeline.data.fence import check_readable, inside
from privacy.gate import MAX_EXTRACTION_RATE, NN_FLOOR_FACTOR
from privacy.release import to_signed_chw

MIN_SAMPLES = samples_for_zero_bound(MAX_EXTRACTION_RATE)  # 299


def load_pixels(shard_dir: str | Path, job: str, allow_sensitive: bool = False) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Keys, images (N, C, H, W) in [-1, 1] (noisy float sets as stored) and labels of a shard set."""
    from pipeline.data.shards import iter_samples, read_manifest

    import contextlib

    check_readable(shard_dir, job=job, allow_sensitive=allow_sensitive)
    keys, xs, ys = [], [], []
    with inside(shard_dir) if allow_sensitive else contextlib.nullcontext():
        field = read_manifest(shard_dir).get("field", "image.npy")
        for key, sample in iter_samples(shard_dir):
            a = np.asarray(sample[field])
            xs.append(to_signed_chw(a) if a.dtype == np.uint8 else a.astype(np.float64))
            ys.append(int(sample.get("cls", -1)))
            keys.append(key)
    return keys, torch.from_numpy(np.stack(xs)).float(), torch.tensor(ys, dtype=torch.long)


def feature_space(train: torch.Tensor, prefer: str = "auto") -> tuple[Features | None, str]:
    """The digits classifier's 64-d features (evals) for 1-channel images, or raw centred pixels.

    ``auto`` picks the classifier for grey images (the digits default) and pixels otherwise. Features are centred on
    the training set's mean: post-ReLU features are non-negative, and uncentred cosines sit near 1 for any pair.
    """
    if prefer == "pixels" or (prefer == "auto" and train.shape[1] != 1):
        return None, "pixels"
    try:
        from evals.digits_classifier import load_digits_classifier
    except ImportError:
        if prefer == "digits_classifier":
            raise ValueError("--features digits_classifier needs evals.digits_classifier (not available)") from None
        return None, "pixels"
    classifier = load_digits_classifier()
    mean = classifier.features(train).mean(dim=0)
    return (lambda x: classifier.features(x) - mean), "digits_classifier"


def criterion(out: dict[str, Any], max_rate: float = MAX_EXTRACTION_RATE,
              nn_factor: float = NN_FLOOR_FACTOR) -> tuple[bool, list[str]]:
    """Pass when (1) enough samples that 0/N bounds the rate below ``max_rate``; (2) the 95% upper bound of the
    released-image extraction rate (a sample copying an original *or its noisy copy*) is <= ``max_rate`` - the
    noisy release's own extraction rate (``noisy_recon_extracted_frac``, 95-100% at s <= 0.2) is reported beside it
    and never raises the bar, so copying released images cannot hide under it; (3) the 5th percentile of the
    samples' NN l2 to the released images is >= ``nn_factor`` x the real-vs-real floor's."""
    reasons = []
    n = int(out["num_generated"])
    if n < samples_for_zero_bound(max_rate):
        reasons.append(f"{n} samples cannot bound the extraction rate below {max_rate:g} "
                       f"(need >= {samples_for_zero_bound(max_rate)})")
    allowed = max_rate
    if out["gen_released_extracted_upper95"] > allowed:
        reasons.append(f"released-image extraction upper bound {out['gen_released_extracted_upper95']:.4f} > "
                       f"{allowed:.4f}")
    if out["gen_released_nn_l2_p05"] < nn_factor * out["floor_nn_l2_p05"]:
        reasons.append(f"NN l2 p05 to released images {out['gen_released_nn_l2_p05']:.4f} < {nn_factor:g} x "
                       f"real-vs-real floor {out['floor_nn_l2_p05']:.4f}")
    return not reasons, reasons


def _subsets(sensitive: str | Path, keys: list[str], release: str | Path | None
             ) -> tuple[torch.Tensor, dict[str, str] | None, dict[str, Any] | None]:
    """A mask of the consented sensitive images, the release's public-key -> sensitive-key map, and its manifest."""
    consented = torch.zeros(len(keys), dtype=torch.bool)
    if release is None:
        return consented, None, None
    from privacy.ledger import read_record
    from privacy.release import read_release

    rec = read_release(release)
    if "release_id" not in rec:
        raise ValueError(f"{release} is a release of an old format (no release_id); release the set again")
    ledger = read_record(sensitive, rec["release_id"])
    given = set(ledger["consented"].values())
    consented = torch.tensor([k in given for k in keys], dtype=torch.bool)
    return consented, ledger["keys"], rec


def audit_checkpoint(checkpoint: str | Path, sensitive: str | Path, *, release: str | Path | None = None,
                     num_samples: int = 500, seed: int = 0, features: str = "auto", n: int = 50,
                     alpha: float = 0.5, denoise_steps: int = 40, log: bool = True, prefix: str = "audit_",
                     max_rate: float = MAX_EXTRACTION_RATE, nn_factor: float = NN_FLOOR_FACTOR,
                     record: bool = True) -> dict[str, Any]:
    """All audit statistics for one checkpoint and its pass/fail; logged into its MLflow run (``prefix``-ed) when
    ``log``; the gate's record written into the checkpoint when ``record``."""
    from pipeline.sampling import sample_classes
    from pipeline.train.checkpoint import find_latest, load_trained

    checkpoint = find_latest(checkpoint)
    if record and release is None:
        raise ValueError(f"the audit of {checkpoint} needs the release it was trained on (--release DIR): the record "
                         f"is signed for that release")
    keys, train, train_labels = load_pixels(sensitive, job="privacy audit", allow_sensitive=True)
    trained = load_trained(checkpoint)
    if tuple(train.shape[1:]) != trained.image_shape:
        raise ValueError(f"checkpoint {checkpoint} makes {trained.image_shape} images, the sensitive set holds "
                         f"{tuple(train.shape[1:])}")
    consented, key_map, rec = _subsets(sensitive, keys, release)
    released = ~consented
    g = torch.Generator().manual_seed(seed)
    if int(trained.data.num_classes or 0) > 0:
        labels = train_labels[torch.randint(len(train_labels), (num_samples,), generator=g)]
    else:
        labels = torch.full((num_samples,), -1, dtype=torch.long)
    generated = sample_classes(trained, labels, seed).x.float().clamp(-1, 1)
    feat, space = feature_space(train, features)
    out: dict[str, Any] = {f"gen_{k}": v for k, v in audit_samples(generated, train, feat, space, alpha, n).items()}

    ext = carlini_extraction(generated, train, alpha=alpha, n=n)
    noisy_ext = None
    if release is not None and key_map is not None:
        nkeys, noisy, nlabels = load_pixels(Path(release) / "noisy", job="privacy audit")
        noisy_ext = carlini_extraction(generated, noisy.clamp(-1, 1), alpha=alpha, n=n)
        out["gen_noisy_copy_extracted_frac"] = noisy_ext.fraction
    out.update({f"gen_{k}": v for k, v in split_extraction(ext, consented, noisy_ext).items()})
    out.update(ratio_histogram(ext.ratio, "gen_carlini_ratio"))
    rel_idx = torch.nonzero(released).flatten()
    d_rel = normalized_l2(unit_pixels(generated), unit_pixels(train[rel_idx])).min(dim=1).values
    out.update(_quantiles(d_rel, "gen_released_nn_l2"))
    if bool(consented.any()):
        d_con = normalized_l2(unit_pixels(generated), unit_pixels(train[consented])).min(dim=1).values
        out.update(_quantiles(d_con, "gen_consented_nn_l2"))
    out.update(nn_floor(train[rel_idx], train, rel_idx))
    out.update({"feature_space": space, "num_generated": num_samples, "num_released": int(released.sum()),
                "num_consented": int(consented.sum())})

    if release is not None and key_map is not None and rec is not None:
        from privacy.sfbd import denoise

        by_key = {k: i for i, k in enumerate(keys)}
        missing = [k for k in nkeys if key_map.get(k) not in by_key]
        if missing:
            raise ValueError(f"release {release} holds {len(missing)} samples that its fence record does not map to "
                             f"{sensitive}")
        originals = train[[by_key[key_map[k]] for k in nkeys]]
        x_hat, nfe = denoise(trained.objective, trained.model, noisy, float(rec["noise_std"]),
                             nlabels if int(trained.data.num_classes or 0) > 0 else None, steps=denoise_steps)
        out.update({f"pool_{k}": v for k, v in audit_reconstructions(x_hat.float().clamp(-1, 1), originals,
                                                                      alpha, n).items()})
        # the noisy copies themselves: the floor of what the release already reveals
        out.update({f"noisy_{k}": v for k, v in audit_reconstructions(noisy.clamp(-1, 1), originals, alpha,
                                                                       n).items()})
        out["pool_denoise_nfe"] = nfe
        out["noise_std"] = float(rec["noise_std"])
    out = {k: v for k, v in out.items() if not k.endswith("_min")}  # aggregates only: no per-sample minimum
    passed, reasons = criterion(out, max_rate, nn_factor)
    out["passed"] = passed
    out["fail_reasons"] = reasons
    out["criterion"] = {"max_extraction_rate": max_rate, "nn_floor_factor": nn_factor, "alpha": alpha, "n": n}
    if log and trained.run_id:
        from pipeline.config import tracking_uri
        from pipeline.tracking import client

        c = client(tracking_uri(trained.config))
        for k, v in out.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                c.log_metric(trained.run_id, f"{prefix}{k}", float(v), step=trained.step)
        c.log_metric(trained.run_id, f"{prefix}passed", float(passed), step=trained.step)
        c.set_tag(trained.run_id, f"{prefix}feature_space", space)
        c.set_tag(trained.run_id, "privacy.audit", "passed" if passed else "failed")
        out["mlflow_run_id"] = trained.run_id
    if record:
        from privacy.gate import write_audit_record

        write_audit_record(checkpoint, out, str(rec["release_id"]))
    return out
