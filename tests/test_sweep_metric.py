"""Sweep metrics on latent data: real validation latents are decoded by their autoencoder before any pixel metric,
so generated and real images are compared in the same (decoded RGB) space; FID can be the sweep metric."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from test_registry_bundle import latent_checkpoint, tiny_autoencoder


@pytest.fixture
def latent_val(tmp_path) -> tuple[Path, Path]:
    """40 digits encoded by a tiny random AutoencoderKL into a latent shard set (manifest names the autoencoder)."""
    from pipeline.data.encode import encode_pixels, load_vae, to_vae_input, vae_scale
    from pipeline.data.shards import ShardSetWriter
    from pipeline.data.sources import digits_split

    vae_dir = tiny_autoencoder(tmp_path / "vae")
    vae = load_vae(vae_dir)
    images, labels = digits_split()["val"]
    pixels = torch.from_numpy(np.asarray(images[:40], np.float32)).reshape(40, 1, 8, 8) / 127.5 - 1
    with torch.no_grad():
        latents = encode_pixels(vae, to_vae_input(pixels, 3), vae_scale(vae))
    extra = {"kind": "latents", "field": "latent.npy", "shape": [4, 4, 4], "dtype": "float32", "num_classes": 10,
             "latent_scale": vae_scale(vae), "vae": str(vae_dir)}
    with ShardSetWriter(tmp_path / "val", 64, extra) as writer:
        for i in range(40):
            writer.write(f"v{i:03d}", {"latent.npy": latents[i].numpy(), "cls": int(labels[i])})
    return tmp_path / "val", vae_dir


def test_real_latents_are_decoded_before_pixel_metrics(latent_val, tmp_path):
    from evals.reference import load_real
    from pipeline.sweep.evaluation import score_checkpoint

    shards, vae = latent_val
    real, labels = load_real(shards, None)
    assert real.shape == (40, 3, 8, 8) and labels.shape == (40,)  # decoded RGB images, not (4, 4, 4) latents
    ckpt = latent_checkpoint(tmp_path / "run", vae, shards)
    scored = score_checkpoint(str(ckpt), ["fd_pixels"], 16, 0)
    assert math.isfinite(scored["fd_pixels"]) and scored["fd_pixels"] > 0 and scored["step"] == 5
    again = score_checkpoint(str(ckpt), ["fd_pixels"], 16, 0, sampler={"steps": 1})
    assert again["nfe"] < scored["nfe"] and again["fd_pixels"] != scored["fd_pixels"]  # the sampler override applies


@pytest.mark.slow  # Inception passes over 16 generated and 40 real images on CPU
def test_fid_is_a_sweep_metric_on_latent_data(latent_val, tmp_path, monkeypatch):
    from evals.inception import WEIGHTS_ENV, WEIGHTS_FILENAME, _import_extractor_module
    from pipeline.sweep.config import load_sweep_config
    from pipeline.sweep.evaluation import score_checkpoint

    module = _import_extractor_module()

    class Unloaded(module.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return super().load_state_dict(state_dict, strict=False)

    import io

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    weights = tmp_path / WEIGHTS_FILENAME
    torch.save(net.state_dict(), weights)
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    monkeypatch.setenv("FLOWRAIL_CACHE", str(tmp_path / "cache"))

    sweep_yaml = tmp_path / "s.yaml"
    sweep_yaml.write_text("tune: {metric: fid, mode: min}\neval: {metrics: [fid], num_samples: 16}\n")
    assert load_sweep_config(str(sweep_yaml)).tune.metric == "fid"
    shards, vae = latent_val
    ckpt = latent_checkpoint(tmp_path / "run", vae, shards)
    scored = score_checkpoint(str(ckpt), ["fid"], 16, 0)
    assert math.isfinite(scored["fid"]) and scored["fid"] > 0
