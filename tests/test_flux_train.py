"""Tiny FLUX fine-tunes on 2 Ray workers: LoRA under ZeRO-2 and full fine-tune under ZeRO-3, on pre-encoded shards."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.config import TrainJobConfig, load_config  # noqa: E402
from pipeline.data.shards import ShardSetWriter  # noqa: E402
from pipeline.flux.export import export_finetuned, log_finetuned  # noqa: E402
from pipeline.flux.lora import load_lora  # noqa: E402
from pipeline.flux.model import build_flux_model  # noqa: E402
from pipeline.flux.objective import flux_velocity  # noqa: E402
from pipeline.flux.tiny import FLUX_SCALE, FLUX_SHIFT, write_tiny_flux_pipeline  # noqa: E402

CAPTIONS = ["a red square", "a blue circle", "green grass", "two stars"]


@pytest.fixture(scope="module")
def flux_data(tmp_path_factory):
    """A tiny FLUX pipeline folder and a pre-encoded shard set in the layout `flowrail flux_encode` writes.

    Four captions, each with its own latent pattern (+ small noise) and fixed text embeddings: learnable quickly.
    """
    root = tmp_path_factory.mktemp("flux-train")
    pipe = write_tiny_flux_pipeline(root / "pipe", CAPTIONS)
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((4, 16, 8, 8)).astype(np.float32)
    t5 = rng.standard_normal((4, 8, 32)).astype(np.float32)
    pooled = rng.standard_normal((4, 16)).astype(np.float32)
    extra = {"kind": "latents", "field": "latent.npy", "shape": [16, 8, 8], "dtype": "float32", "num_classes": 0,
             "cond_fields": {"t5.npy": [8, 32], "clip_pooled.npy": [16]}, "vae": str(pipe / "vae"),
             "shift_factor": FLUX_SHIFT, "latent_scale": FLUX_SCALE, "encoder": "flux"}
    with ShardSetWriter(root / "enc", 64, extra) as writer:
        for i in range(256):
            c = i % 4
            latent = patterns[c] + 0.05 * rng.standard_normal((16, 8, 8)).astype(np.float32)
            writer.write(f"s{i:05d}", {"latent.npy": latent, "t5.npy": t5[c], "clip_pooled.npy": pooled[c],
                                       "txt": CAPTIONS[c]})
    return pipe, root / "enc"


def _probe(model):
    gen = torch.Generator().manual_seed(5)
    x, t5, pooled = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 8, 32, generator=gen), torch.randn(2, 16)
    with torch.no_grad():
        return flux_velocity(model.eval(), x, torch.tensor([0.3, 0.7]), t5, pooled, 1.0)


def _losses(result) -> list[float]:
    from pipeline.tracking import client

    history = client(result.tracking_uri).get_metric_history(result.run_id, "loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two Ray Train runs; minutes on a loaded 2-core machine
@pytest.mark.parametrize("mode,zero", [("lora", 2), ("full", 3)])
def test_tiny_flux_finetune_on_two_workers(mode, zero, flux_data, ray_local, tmp_path):
    from pipeline.train.trainer import fit

    pipe, shards = flux_data
    overrides = {
        "model": "flux", "run_name": f"flux-{mode}", "run_dir": str(tmp_path), "data.shards": str(shards),
        "data.val_shards": None, "data.image_size": None, "data.batch_size": 16, "flux.weights": str(pipe),
        "flux.mode": mode, "flux.lora_rank": 8, "flux.grad_checkpointing": True, "train.zero_stage": zero,
        "train.num_workers": 2, "train.cpus_per_worker": 0.5, "train.steps": 30, "train.log_every": 5,
        "train.checkpoint_every": 30, "train.lr": 1e-2 if mode == "lora" else 2e-3,
        "transport.time_sampler": "logit_normal",
    }
    cfg = load_config(TrainJobConfig, "train", [f"{k}={'null' if v is None else v}" for k, v in overrides.items()])
    result = fit(cfg, make_grid=False)
    losses = _losses(result)
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.95 * np.mean(losses[:2]), losses

    # export what users load (diffusers LoRA file / diffusers folder) and log it to the run
    out = export_finetuned(result.checkpoint, tmp_path / "export")
    artifact = log_finetuned(out, mode, result.tracking_uri, result.run_id)
    from pipeline.tracking import client

    logged = [f.path for f in client(result.tracking_uri).list_artifacts(result.run_id, artifact)]
    assert logged, artifact
    base = build_flux_model(cfg.flux)
    tuned = load_lora(build_flux_model(cfg.flux), out) if mode == "lora" else build_flux_model(
        cfg.flux.model_copy(update={"weights": str(out)}))
    assert not torch.allclose(_probe(tuned), _probe(base))
