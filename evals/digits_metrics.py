"""Metrics for the embedded digits default, all in the feature space of :mod:`evals.digits_classifier`.

- ``fd_digits``: Fréchet distance between generated and reference features (a Fréchet distance in the digits
  classifier's 64-d penultimate layer; it is not FID and is never called that).
- ``precision`` / ``recall``: k-NN manifold estimates (k = 3) against the reference features.
- ``classifier_accuracy``: fraction of class-conditional samples the classifier assigns to the requested label.

The reference set is the digits train split (what the generator models), resized to the run's image size exactly
as the training pipeline does. Generated images are summarised by a :class:`DigitsTally` — a small, picklable,
mergeable record (feature statistics, the features themselves for k-NN, per-class hit counts) — so that workers
can each tally their own samples and the driver reduces once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from evals.digits_classifier import FEATURE_DIM, NUM_CLASSES, DigitsClassifier, digits_images
from evals.frechet import RunningStats, frechet_distance
from evals.precision_recall import precision_recall

DIGITS_METRICS = ("fd_digits", "precision", "recall", "classifier_accuracy")


@dataclass
class DigitsTally:
    """Everything the digits metrics need from a set of generated images."""

    stats: RunningStats = field(default_factory=lambda: RunningStats(FEATURE_DIM))
    features: list[torch.Tensor] = field(default_factory=list)  # float32 chunks, for precision/recall
    correct: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES, np.int64))
    total: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES, np.int64))

    def add(self, classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor | None) -> "DigitsTally":
        """Tally a batch of generated images (labels: the classes they were asked to be, or None)."""
        feats = classifier.features(images)
        self.stats.update(feats)
        self.features.append(feats.float())
        if labels is not None:
            with torch.no_grad():
                pred = classifier.head(feats.float()).argmax(1)
            labels = labels.long().cpu()
            valid = (labels >= 0) & (labels < NUM_CLASSES)
            self.total = self.total + np.bincount(labels[valid].numpy(), minlength=NUM_CLASSES)
            self.correct = self.correct + np.bincount(labels[valid & (pred == labels)].numpy(), minlength=NUM_CLASSES)
        return self

    def merge(self, other: "DigitsTally") -> "DigitsTally":
        self.stats.merge(other.stats)
        self.features.extend(other.features)
        self.correct = self.correct + other.correct  # not in place: Ray hands back read-only arrays
        self.total = self.total + other.total
        return self

    @property
    def n(self) -> int:
        return self.stats.n


@dataclass
class DigitsReference:
    """Reference features of real digits: their Gaussian statistics and the features themselves."""

    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor

    @classmethod
    def from_images(cls, classifier: DigitsClassifier, images: torch.Tensor) -> "DigitsReference":
        feats = classifier.features(images)
        stats = RunningStats(FEATURE_DIM).update(feats)
        return cls(mu=stats.mean, sigma=stats.cov, features=feats.float())


def digits_reference(classifier: DigitsClassifier, image_size: int | None, split: str = "train",
                     half: str | None = None) -> DigitsReference:
    """Reference statistics of the real digits ``split`` at the run's image size; ``half``: only its even-indexed
    (``select``) or odd-indexed (``gate``) images (:func:`evals.reference.reference_half`)."""
    from evals.reference import reference_half

    images, _ = digits_images(split, image_size)
    return DigitsReference.from_images(classifier, reference_half(images, half))


def digits_metrics(tally: DigitsTally, reference: DigitsReference, k: int = 3) -> dict[str, float]:
    """``fd_digits``, ``precision``, ``recall`` and (when labels were given) ``classifier_accuracy``."""
    if tally.n < 2:
        raise ValueError(f"digits metrics need at least 2 generated samples, got {tally.n}")
    fake = torch.cat(tally.features)
    pr = precision_recall(reference.features, fake, k=k)
    out = {"fd_digits": frechet_distance(tally.stats.mean, tally.stats.cov, reference.mu, reference.sigma),
           "precision": pr.precision, "recall": pr.recall}
    if tally.total.sum() > 0:
        out["classifier_accuracy"] = float(tally.correct.sum() / tally.total.sum())
    return out


def evaluate_images(classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor | None,
                    reference: DigitsReference, batch_size: int = 1024) -> dict[str, float]:
    """All digits metrics for one in-memory set of images (convenience for tests and small runs)."""
    tally = DigitsTally()
    for i in range(0, len(images), batch_size):
        tally.add(classifier, images[i:i + batch_size], None if labels is None else labels[i:i + batch_size])
    return digits_metrics(tally, reference)
