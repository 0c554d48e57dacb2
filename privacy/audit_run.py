"""``flowrail privacy audit``: memorization statistics of a trained checkpoint, logged to MLflow.

1. Generated samples (class-conditional, labels in the sensitive set's proportions) against the sensitive set:
   Carlini extraction, nearest-neighbour l2, max cosine similarity (:mod:`privacy.audit`).
2. With ``release``: the checkpoint's model denoises the release's noisy copies (from ``t*``, as SFBD does), and the
   reconstructions are compared with their own private originals — how much a model holder could recover.

Reads the sensitive set inside the privacy boundary (``allow_sensitive``) and writes only statistics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from privacy.audit import Features, audit_reconstructions, audit_samples
from privacy.boundary import check_readable
from privacy.release import to_signed_chw


def load_pixels(shard_dir: str | Path, job: str, allow_sensitive: bool = False) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Keys, images (N, C, H, W) in [-1, 1] (noisy float sets as stored) and labels of a shard set."""
    from pipeline.data.shards import iter_samples, read_manifest

    check_readable(shard_dir, job=job, allow_sensitive=allow_sensitive)
    field = read_manifest(shard_dir).get("field", "image.npy")
    keys, xs, ys = [], [], []
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


def audit_checkpoint(checkpoint: str | Path, sensitive: str | Path, *, release: str | Path | None = None,
                     num_samples: int = 500, seed: int = 0, features: str = "auto", n: int = 50,
                     alpha: float = 0.5, denoise_steps: int = 40, log: bool = True,
                     prefix: str = "audit_") -> dict[str, Any]:
    """All audit statistics for one checkpoint; logged into its MLflow run (``prefix``-ed) when ``log``."""
    from pipeline.sampling import sample_classes
    from pipeline.train.checkpoint import load_trained

    keys, train, train_labels = load_pixels(sensitive, job="privacy audit", allow_sensitive=True)
    trained = load_trained(checkpoint)
    if tuple(train.shape[1:]) != trained.image_shape:
        raise ValueError(f"checkpoint {checkpoint} makes {trained.image_shape} images, the sensitive set holds "
                         f"{tuple(train.shape[1:])}")
    g = torch.Generator().manual_seed(seed)
    labels = train_labels[torch.randint(len(train_labels), (num_samples,), generator=g)]
    generated = sample_classes(trained, labels, seed).x.float().clamp(-1, 1)
    feat, space = feature_space(train, features)
    out: dict[str, Any] = {f"gen_{k}": v for k, v in audit_samples(generated, train, feat, space, alpha, n).items()}
    out["feature_space"] = space
    out["num_generated"] = num_samples

    if release is not None:
        from privacy.release import read_release
        from privacy.sfbd import denoise

        rec = read_release(release)
        nkeys, noisy, nlabels = load_pixels(Path(release) / "noisy", job="privacy audit")
        by_key = {k: i for i, k in enumerate(keys)}
        missing = [k for k in nkeys if k not in by_key]
        if missing:
            raise ValueError(f"release {release} holds {len(missing)} samples not in {sensitive} (e.g. {missing[0]})")
        originals = train[[by_key[k] for k in nkeys]]
        x_hat, nfe = denoise(trained.objective, trained.model, noisy, float(rec["noise_std"]), nlabels,
                             steps=denoise_steps)
        out.update({f"pool_{k}": v for k, v in audit_reconstructions(x_hat.float().clamp(-1, 1), originals,
                                                                      alpha, n).items()})
        # the noisy copies themselves, as the floor of what the release already reveals
        out.update({f"noisy_{k}": v for k, v in audit_reconstructions(noisy.clamp(-1, 1), originals, alpha,
                                                                       n).items()})
        out["pool_denoise_nfe"] = nfe
    if log and trained.run_id:
        from pipeline.config import tracking_uri
        from pipeline.tracking import client

        c = client(tracking_uri(trained.config))
        for k, v in out.items():
            if isinstance(v, (int, float)):
                c.log_metric(trained.run_id, f"{prefix}{k}", float(v), step=trained.step)
        c.set_tag(trained.run_id, f"{prefix}feature_space", space)
        out["mlflow_run_id"] = trained.run_id
    return out
