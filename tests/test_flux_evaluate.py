"""Evaluating a FLUX checkpoint: captions of the shard set as classes, Euler on the FLUX shifted schedule with the
guidance value, decoded by the FLUX autoencoder (shift and scale)."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.config import TrainJobConfig, load_config
from pipeline.data.shards import ShardSetWriter
from pipeline.data.streaming import DataInfo
from pipeline.flux.tiny import FLUX_SCALE, FLUX_SHIFT, write_tiny_flux_pipeline

CAPTIONS = ["a red square", "a blue circle", "green grass"]


def _checkpoint(tmp_path):
    """A tiny FLUX pipeline, a 6-record pre-encoded shard set and a LoRA checkpoint (flowrail.json + EMA file)."""
    from pipeline.flux.lora import prepare_for_training
    from pipeline.flux.model import build_flux_model
    from pipeline.train.checkpoint import EMA_FILE, META
    from pipeline.train.ema import EMA

    pipe = write_tiny_flux_pipeline(tmp_path / "pipe", CAPTIONS)
    rng = np.random.default_rng(0)
    extra = {"kind": "latents", "field": "latent.npy", "shape": [16, 8, 8], "dtype": "float32", "num_classes": 0,
             "cond_fields": {"t5.npy": [6, 32], "clip_pooled.npy": [16]}, "vae": str(pipe / "vae"),
             "shift_factor": FLUX_SHIFT, "latent_scale": FLUX_SCALE, "encoder": "flux"}
    with ShardSetWriter(tmp_path / "enc", 4, extra) as writer:
        for i in range(6):
            writer.write(f"s{i:05d}", {"latent.npy": rng.standard_normal((16, 8, 8)).astype(np.float32),
                                       "t5.npy": rng.standard_normal((6, 32)).astype(np.float32) + i % 3,
                                       "clip_pooled.npy": rng.standard_normal(16).astype(np.float32),
                                       "txt": CAPTIONS[i % 3]})
    cfg = load_config(TrainJobConfig, "train", [
        "model=flux", f"flux.weights={pipe}", "flux.mode=lora", "flux.lora_rank=4", "flux.guidance=3.5",
        f"data.shards={tmp_path / 'enc'}", "data.val_shards=null", "data.image_size=null", "sampler.steps=3",
        "eval.num_samples=6", "eval.num_workers=1", "eval.metrics=[]", f"run_dir={tmp_path}"])
    model = prepare_for_training(build_flux_model(cfg.flux), cfg.flux)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # an adapter that changes the output
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(EMA(model, 0.9).state_dict(), str(ckpt / EMA_FILE))
    info = DataInfo(kind="latents", field="latent.npy", channels=16, size=8, num_classes=0, num_samples=6,
                    latent_scale=FLUX_SCALE, vae=str(pipe / "vae"), cond_fields=extra["cond_fields"])
    (ckpt / META).write_text(json.dumps({"format": "flowrail-checkpoint/1", "step": 7, "epoch": 0,
                                         "config": cfg.model_dump(mode="json"), "data": info.to_dict()}))
    return cfg, ckpt, pipe, model


def test_flux_checkpoint_evaluates_with_shifted_euler_and_autoencoder(tmp_path):
    from evals.evaluate import run_evaluation
    from pipeline.data.shards import iter_samples
    from pipeline.flux.encode import decode_latents, load_autoencoder
    from pipeline.flux.objective import flux_velocity
    from pipeline.sampling import sample_classes
    from pipeline.train.checkpoint import load_trained
    from pipeline.transport.timesteps import flux_mu

    cfg, ckpt, pipe, model = _checkpoint(tmp_path)
    trained = load_trained(ckpt, overrides=cfg)
    assert trained.num_classes == 3 and trained.objective.captions == CAPTIONS

    labels = torch.tensor([2, 0])
    got = sample_classes(trained, labels, seed=11).x  # what every evaluation worker runs per batch

    # the same samples written out: caption embeddings, Euler over sigma 1 -> 0 shifted by exp(mu(16 tokens)),
    # guidance 3.5, then D(latent / scale + shift)
    records = [s for _, s in iter_samples(tmp_path / "enc")]
    t5 = torch.stack([torch.from_numpy(records[i]["t5.npy"]) for i in labels.tolist()])
    pooled = torch.stack([torch.from_numpy(records[i]["clip_pooled.npy"]) for i in labels.tolist()])
    x = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(11))
    m = math.exp(flux_mu(16))
    sigmas = [1.0] + [m / (m + (1 / s - 1)) for s in torch.linspace(1, 0, 4)[1:-1].tolist()] + [0.0]
    model.eval()
    with torch.no_grad():
        for s, s_next in itertools.pairwise(sigmas):
            x = x + (s - s_next) * flux_velocity(model, x, torch.full((2,), 1 - s), t5, pooled, 3.5)
    want = decode_latents(load_autoencoder(pipe / "vae"), x)
    assert got.shape == want.shape == (2, 3, 16, 16)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()

    result = run_evaluation(trained, cfg)  # the `flowrail evaluate` path: 6 samples, two per caption
    assert result.metrics["nfe"] == 3 and result.metrics["eval_samples"] == 6
    assert sorted(result.examples) == [0, 1, 2]
    assert all(v.shape[1:] == (3, 16, 16) and torch.isfinite(v).all() for v in result.examples.values())
