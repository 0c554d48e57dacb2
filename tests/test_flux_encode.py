"""Pre-encoding image + caption shards into FLUX latents and text embeddings with Ray Data actors."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.data.shards import iter_samples, write_shard_set  # noqa: E402
from pipeline.errors import DataError  # noqa: E402
from pipeline.flux.encode import EncoderPaths, FluxEncoder, decode_latents, encode_shards, load_autoencoder  # noqa: E402
from pipeline.flux.tiny import FLUX_SCALE, FLUX_SHIFT, write_tiny_flux_pipeline  # noqa: E402

CAPTIONS = ["a red square", "a blue circle", "green grass under a blue sky", "two red circles"]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return write_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe", CAPTIONS)


def _source(root, n=6):
    rng = np.random.default_rng(0)
    samples = [(f"s{i:03d}", {"image.npy": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
                              "txt": CAPTIONS[i % len(CAPTIONS)]}) for i in range(n)]
    write_shard_set(root, iter(samples), samples_per_shard=4,
                    extra={"kind": "pixels", "field": "image.npy", "shape": [3, 20, 24], "num_classes": 0})
    return dict(samples)


def test_encode_shards_writes_latents_and_text_embeddings(tmp_path, tiny_pipeline, ray_local):
    source = _source(tmp_path / "src")
    paths = EncoderPaths.from_pipeline(tiny_pipeline)
    manifest = encode_shards(tmp_path / "src", tmp_path / "enc", paths, size=16, t5_max_length=8, batch_size=4,
                             concurrency=1, num_cpus=0.5, samples_per_shard=4)
    assert manifest["num_samples"] == 6 and manifest["kind"] == "latents" and manifest["shape"] == [16, 8, 8]
    assert manifest["cond_fields"] == {"t5.npy": [8, 32], "clip_pooled.npy": [16]}
    assert (manifest["shift_factor"], manifest["latent_scale"]) == (FLUX_SHIFT, FLUX_SCALE)
    encoded = dict(iter_samples(tmp_path / "enc"))
    assert set(encoded) == set(source)

    # The same sample encoded directly: latents are (mode - shift) * scale, text embeddings per caption.
    ref = FluxEncoder(paths=paths.__dict__, size=16, t5_max_length=8)
    key = "s005"
    direct = ref({"__key__": np.array([key]), "image.npy": [source[key]["image.npy"]],
                  "txt": np.array([source[key]["txt"]])})
    got = encoded[key]
    assert got["txt"] == "a blue circle"
    np.testing.assert_allclose(got["latent.npy"], direct["latent"][0], atol=1e-5)
    np.testing.assert_allclose(got["t5.npy"], direct["t5"][0], atol=1e-5)
    np.testing.assert_allclose(got["clip_pooled.npy"], direct["clip_pooled"][0], atol=1e-5)
    # latents are (posterior mode - shift) * scale of the [-1, 1] image (a 16x16 image needs no resize)
    img = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mine = ref({"__key__": np.array(["k"]), "image.npy": [img], "txt": np.array(["a red square"])})["latent"][0]
    vae = load_autoencoder(paths.vae)
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1).latent_dist.mode()
    np.testing.assert_allclose(mine, ((z - FLUX_SHIFT) * FLUX_SCALE)[0].numpy(), atol=1e-5)
    # different captions give different embeddings
    assert not np.allclose(encoded["s000"]["t5.npy"], encoded["s001"]["t5.npy"])
    # decoding undoes the normalisation
    with torch.no_grad():
        torch.testing.assert_close(decode_latents(vae, torch.from_numpy(mine)[None]),
                                   vae.decode(z).sample.clamp(-1, 1), atol=1e-4, rtol=1e-4)


def test_encode_errors_are_named(tmp_path, tiny_pipeline):
    paths = EncoderPaths.from_pipeline(tiny_pipeline)
    with pytest.raises(ValueError, match="multiple of 16"):
        encode_shards(tmp_path, tmp_path / "o", paths, size=20)
    with pytest.raises(DataError, match="no shards"):
        encode_shards(tmp_path / "nothing", tmp_path / "o", paths, size=16)
    with pytest.raises(FileNotFoundError, match="vae"):
        EncoderPaths.from_pipeline(tmp_path)
    enc = FluxEncoder(paths=paths.__dict__, size=16, t5_max_length=8)
    with pytest.raises(DataError, match="no caption"):
        enc({"__key__": np.array(["k1"]), "image.npy": [np.zeros((16, 16, 3), np.uint8)]})
