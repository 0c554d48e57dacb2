"""Standard FID path (evals/inception.py, evals/reference.py) with locally saved, randomly initialised weights."""
import io
import os

import numpy as np
import pytest
import torch

from evals.frechet import RunningStats, load_stats
from evals.inception import (WEIGHTS_ENV, WEIGHTS_FILENAME, InceptionFeatures, _import_extractor_module,
                             fid_from_stats, find_inception_weights)
from evals.reference import reference_stats


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 state dict, randomly initialised (He init so features do not vanish)."""
    module = _import_extractor_module()

    class Unloaded(module.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return super().load_state_dict(state_dict, strict=False)

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILENAME
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def tiny_shards(tmp_path):
    from pipeline.data.shards import write_shard_set
    from pipeline.data.sources import digits_split

    images, labels = digits_split()["val"]
    samples = ((f"v{i:03d}", {"image.npy": images[i], "cls": int(labels[i])}) for i in range(6))
    write_shard_set(tmp_path / "val", samples, samples_per_shard=4,
                    extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8], "dtype": "uint8",
                           "num_classes": 10})
    return tmp_path / "val"


@pytest.mark.slow  # one 2048-d matrix square root plus six Inception passes: about a minute of CPU here
def test_fid_end_to_end(random_weights, tiny_shards, tmp_path):
    inception = InceptionFeatures(random_weights)
    mu, sigma = reference_stats(tiny_shards, inception, feature_name="inception", dim=2048, image_size=16,
                                cache_dir=tmp_path, max_samples=3)
    cached = list((tmp_path / "reference").glob("inception-*.npz"))
    assert len(cached) == 1
    np.testing.assert_array_equal(load_stats(cached[0])[0], mu)
    # second call reads the cache: a feature function that would fail is never called
    mu2, _ = reference_stats(tiny_shards, lambda x: 1 / 0, feature_name="inception", dim=2048, image_size=16,
                             cache_dir=tmp_path, max_samples=3)
    np.testing.assert_array_equal(mu, mu2)

    fake = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    stats = RunningStats(2048).update(inception(fake))
    fid = fid_from_stats(stats, (mu, sigma))
    assert np.isfinite(fid) and fid > 0



def test_missing_weights_error_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as err:
        InceptionFeatures()
    message = str(err.value)
    assert "\n" not in message and WEIGHTS_FILENAME in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message and WEIGHTS_ENV in message
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        find_inception_weights(str(tmp_path / "nope.pth"))
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "also-nope.pth"))
    with pytest.raises(FileNotFoundError, match=WEIGHTS_ENV):
        find_inception_weights()


def test_weights_found_in_torch_hub_cache_and_unsafe_pickles_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / WEIGHTS_FILENAME
    cached.parent.mkdir(parents=True)
    torch.save({"not": os.getcwd}, cached)  # a pickled function: not a plain tensor state dict
    assert find_inception_weights() == cached
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        InceptionFeatures()
    torch.save({"fc.weight": torch.zeros(2, 2)}, cached)
    with pytest.raises(ValueError, match="do not match"):
        InceptionFeatures()
