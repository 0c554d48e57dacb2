"""Latent pre-encoding with a tiny real AutoencoderKL in a Ray Data actor pool, decoding, and a latent training run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.encode import decode_latents, encode_pixels, load_vae, to_vae_input
from pipeline.data.shards import iter_samples, read_manifest


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    """A randomly initialised AutoencoderKL (RGB, 2x down-sampling, 4 latent channels), saved locally."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def digit_latents(ray_local, digits_shards, tiny_vae, tmp_path_factory) -> Path:
    """Digits (upsampled to 16x16) encoded to 4x8x8 latents through ``flowrail encode``."""
    from jobs.cli import main

    out = tmp_path_factory.mktemp("latents")
    rc = main(["encode", "--vae", str(tiny_vae), "--src", str(digits_shards), "--out", str(out), "--size", "16",
               "--batch-size", "128", "--samples-per-shard", "512"])
    assert rc == 0
    return out


def test_manifest_records_scale_shape_and_labels(digit_latents, digits_shards, tiny_vae) -> None:
    for split, n in (("train", 1438), ("val", 359)):
        m = read_manifest(digit_latents / split)
        assert m["kind"] == "latents" and m["field"] == "latent.npy" and m["shape"] == [4, 8, 8]
        assert m["latent_scale"] == pytest.approx(0.18215) and m["num_samples"] == n
        assert m["vae"] == str(tiny_vae.resolve()) and m["num_classes"] == 10 and len(m["shards"]) == -(-n // 512)
    src = dict(iter_samples(digits_shards / "val"))
    enc = dict(iter_samples(digit_latents / "val"))
    assert list(enc) == list(src)  # order and keys preserved
    assert all(enc[k]["cls"] == src[k]["cls"] for k in src)
    # the stored latent is 0.18215 x the posterior mean of the upsampled, RGB-expanded image
    vae = load_vae(tiny_vae)
    keys = list(src)[:4]
    pixels = torch.from_numpy(np.stack([src[k]["image.npy"] for k in keys])).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = encode_pixels(vae, to_vae_input(pixels, 3, 16), 0.18215)
    stored = torch.from_numpy(np.stack([enc[k]["latent.npy"] for k in keys]))
    assert stored.dtype == torch.float32 and torch.allclose(stored, expected, atol=1e-5)
    assert torch.allclose(stored / 0.18215, vae.encode(to_vae_input(pixels, 3, 16)).latent_dist.mean, atol=1e-4)


def test_decode_inverts_the_scale(tiny_vae) -> None:
    vae = load_vae(tiny_vae)
    z = torch.randn(2, 4, 8, 8)
    images = decode_latents(vae, z * 0.18215)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    with torch.no_grad():
        assert torch.allclose(images, vae.decode(z).sample.clamp(-1, 1), atol=1e-5)


def test_streaming_reads_latent_shards(digit_latents) -> None:
    from pipeline.data.streaming import Decode, describe

    _, info = describe(str(digit_latents / "train"), image_size=16)
    assert (info.kind, info.channels, info.size, info.num_classes) == ("latents", 4, 8, 10)
    assert info.latent_scale == pytest.approx(0.18215) and info.vae
    key, sample = next(iter(iter_samples(digit_latents / "train")))
    out = Decode(info)({"__key__": np.array([key]), "latent.npy": [sample["latent.npy"]],
                        "cls": np.array([sample["cls"]])})
    assert np.array_equal(out["image"][0], sample["latent.npy"]) and out["label"][0] == sample["cls"]


def test_cli_errors_are_one_line(tmp_path, digits_shards, tiny_vae, capsys) -> None:
    from jobs.cli import main

    assert main(["encode", "--vae", str(tmp_path / "nope"), "--src", str(digits_shards), "--out", str(tmp_path)]) == 2
    assert "autoencoder folder" in capsys.readouterr().err
    assert main(["encode", "--vae", str(tiny_vae), "--src", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "no shard set" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.exhaustive  # CI: test_sweep_e2e.py trains latent SiT through Ray Train and scores decoded images
def test_latent_sit_run_end_to_end(ray_local, digit_latents, tmp_path) -> None:
    """`flowrail train` on latent shards: loss falls, and the sample grid is decoded back to 16x16 RGB images."""
    from conftest import tiny_train_overrides
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.sampling import sample_classes
    from pipeline.train.checkpoint import load_trained
    from pipeline.train.trainer import fit

    overrides = tiny_train_overrides(digit_latents, tmp_path, run_name="latent", **{"train.steps": 20})
    cfg = load_config(TrainJobConfig, "train", overrides)
    result = fit(cfg)
    from mlflow.tracking import MlflowClient

    losses = sorted((m.step, m.value) for m in MlflowClient(result.tracking_uri).get_metric_history(result.run_id,
                                                                                                      "loss"))
    assert losses[-1][1] < losses[0][1], losses
    assert result.grid is not None and result.grid.is_file()
    trained = load_trained(result.checkpoint)
    assert trained.image_shape == (4, 8, 8) and trained.data.kind == "latents"
    out = sample_classes(trained, torch.tensor([0, 1]), seed=0)
    assert out.x.shape == (2, 3, 16, 16) and out.x.abs().max() <= 1
