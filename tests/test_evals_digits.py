"""The digits classifier and the metrics in its feature space (evals/digits_classifier.py, evals/digits_metrics.py)."""
import pytest
import torch
import torch.nn.functional as F

from evals.digits_classifier import FEATURE_DIM, classifier_path, digits_images, load_digits_classifier
from evals.digits_metrics import digits_metrics, digits_reference, evaluate_images, DigitsTally


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model = load_digits_classifier(cache)  # trains (a few CPU seconds) and caches
    assert classifier_path(cache).is_file()
    return model, cache


def test_classifier_accuracy_cache_and_any_input_size(classifier):
    model, cache = classifier
    assert model.val_accuracy > 0.95
    reloaded = load_digits_classifier(cache)  # from the cache file, not retrained
    assert reloaded.val_accuracy == model.val_accuracy
    for size in (8, 16, 32):  # the stored 8x8 digits, the training size, an upsampled size
        x, y = digits_images("val", size if size != 8 else None)
        assert x.shape[-1] == size
        assert (reloaded.predict(x) == y).double().mean() > 0.93
    x, _ = digits_images("val", 16)
    torch.testing.assert_close(reloaded.features(x[:10]), model.features(x[:10]))
    assert model.features(x[:10]).shape == (10, FEATURE_DIM)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model.features(torch.zeros(2, 3, 16, 16))


def test_real_digits_rank_far_better_than_noise_and_blur(classifier):
    model, _ = classifier
    reference = digits_reference(model, 16, split="train")
    real, labels = digits_images("val", 16)  # held-out real digits: the perfect generator
    g = torch.Generator().manual_seed(0)
    noise = (torch.randn(real.shape, generator=g) * 0.5).clamp(-1, 1)  # an untrained model's output
    blur = F.avg_pool2d(F.avg_pool2d(real, 5, 1, 2), 5, 1, 2)  # an early model: right layout, no strokes
    m_real = evaluate_images(model, real, labels, reference)
    m_noise = evaluate_images(model, noise, labels, reference)
    m_blur = evaluate_images(model, blur, labels, reference)
    assert m_real["fd_digits"] * 10 < m_blur["fd_digits"] < m_noise["fd_digits"]
    assert m_real["precision"] > 0.6 and m_real["recall"] > 0.6
    assert m_noise["precision"] < 0.05 and m_noise["recall"] < 0.05
    assert m_blur["precision"] < m_real["precision"] / 2
    assert m_real["classifier_accuracy"] > 0.95 and m_noise["classifier_accuracy"] < 0.3


def test_tallies_merge_like_one_pass(classifier):
    model, _ = classifier
    reference = digits_reference(model, 16, split="train")
    x, y = digits_images("val", 16)
    one = DigitsTally().add(model, x, y)
    merged = DigitsTally().add(model, x[:100], y[:100]).merge(DigitsTally().add(model, x[100:], y[100:]))
    a, b = digits_metrics(one, reference), digits_metrics(merged, reference)
    assert a.keys() == b.keys() == {"fd_digits", "precision", "recall", "classifier_accuracy"}
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-9)
    assert "classifier_accuracy" not in digits_metrics(DigitsTally().add(model, x, None), reference)
