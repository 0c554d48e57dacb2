"""Self-contained registered models and the promotion gate.

A latent SiT registered with its autoencoder loads and samples RGB images in a fresh process after the original
autoencoder folder is gone; a model whose autoencoder (or FLUX base) cannot be found is refused with one line; the
gate moves @champion only for a better number on the same metric and protocol."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.promotion import Score, decide_rescored


def tiny_autoencoder(folder: Path) -> Path:
    """A real diffusers AutoencoderKL with random weights: 3 -> 4 latent channels, 2x downsampling."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4, sample_size=8).save_pretrained(folder)
    return folder


def latent_checkpoint(root: Path, vae: Path | None, shards: Path | None = None) -> Path:
    """A flowrail checkpoint (flowrail.json + ema.safetensors) of a tiny SiT on 4x4x4 latents of ``vae`` (trained
    on ``shards``, else on a manifest-only stand-in)."""
    from safetensors.torch import save_file

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.data.streaming import DataInfo
    from pipeline.models import build_model
    from pipeline.train.checkpoint import EMA_FILE, META

    if shards is None:
        shards = root / "latent-shards"
        shards.mkdir(parents=True)
        (shards / "manifest.json").write_text(json.dumps({"kind": "latents", "shape": [4, 4, 4], "num_samples": 100}))
    cfg = load_config(TrainJobConfig, "train", ["model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                                                "model.patch_size=2", "sampler.steps=3", f"run_dir={root}",
                                                f"data.shards={shards}", f"data.val_shards={shards}"])
    info = DataInfo(kind="latents", field="latent.npy", channels=4, size=4, num_classes=10, num_samples=100,
                    latent_scale=0.5, vae=str(vae) if vae else None)
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=4, input_size=4, num_classes=10, flux_cfg=cfg.flux)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = root / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    save_file(model.state_dict(), str(ckpt / EMA_FILE))
    (ckpt / META).write_text(json.dumps({"format": "flowrail-checkpoint/1", "step": 5, "epoch": 0,
                                         "config": cfg.model_dump(mode="json"), "data": info.to_dict()}))
    return ckpt


PREDICT = textwrap.dedent("""
    import json, sys
    import mlflow, numpy as np, pandas as pd
    from mlflow.models import get_model_info
    model = mlflow.pyfunc.load_model(sys.argv[1])
    images = model.predict(pd.DataFrame({"label": [1, 4, 4], "seed": [3, 3, 9]}))
    spec = get_model_info(sys.argv[1]).signature.outputs.to_dict()[0]["tensor-spec"]["shape"]
    print(json.dumps({"shape": list(images.shape), "dtype": str(images.dtype), "spec": spec,
                      "seed_matters": bool((images[1] != images[2]).any()), "std": float(images.std())}))
""")


@pytest.mark.timeout(1200)  # a fresh process loads the model: minutes on a loaded 2-core machine
def test_latent_model_is_registered_with_its_autoencoder_and_predicts_rgb(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs.cli import main

    vae = tiny_autoencoder(tmp_path / "vae")
    ckpt = latent_checkpoint(tmp_path, vae)
    assert main(["register", str(ckpt), "--name", "latent-bundle", "--force-champion",
                 "--tracking-uri", mlflow_server]) == 0
    shutil.rmtree(vae)  # the registered model must not need the training machine's autoencoder folder
    c = MlflowClient(mlflow_server)
    version = c.get_model_version_by_alias("latent-bundle", "champion")
    assert version.tags["flowrail.family"] == "latent" and "Training run" in version.description
    reqs = Path(c.download_artifacts(version.run_id, "model/requirements.txt", str(tmp_path))).read_text()
    assert "diffusers==" in reqs and "torch==" in reqs
    run = c.get_run(version.run_id)
    assert [d.dataset.source for d in run.inputs.dataset_inputs] == [json.dumps({"uri": str(tmp_path / "latent-shards")})]

    proc = subprocess.run([sys.executable, "-c", PREDICT, "models:/latent-bundle@champion"], cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [3, 8, 8, 3] and out["dtype"] == "uint8"  # decoded RGB, not 4x4x4 latents
    assert out["spec"] == [-1, 8, 8, 3] and out["seed_matters"] and out["std"] > 0


@pytest.mark.parametrize("family", ["latent", "flux"])
def test_register_without_autoencoder_or_base_is_one_line_exit_2(tmp_path, capsys, family):
    from jobs.cli import main
    from pipeline.train.checkpoint import META

    ckpt = latent_checkpoint(tmp_path, tmp_path / "gone-vae")
    if family == "flux":
        meta = json.loads((ckpt / META).read_text())
        meta["config"]["model"]["name"] = "flux"
        meta["config"]["flux"]["weights"] = str(tmp_path / "no-flux-base")
        (ckpt / META).write_text(json.dumps(meta))
    assert main(["register", str(ckpt), "--name", "refused", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert ("FLUX base weights are not found" if family == "flux" else "autoencoder") in err


def test_promotion_gate_promotes_only_beyond_the_seeds_spread():
    """decide_rescored: the candidate's mean must beat the champion's by more than the larger per-seed range."""
    proto = {"num_samples": 64, "seeds": [1, 2], "reference": "/val"}
    champion = Score.of("fd_pixels", [3.0, 3.2], proto)  # spread 0.2
    first = decide_rescored(Score.of("fd_pixels", [3.0, 3.1], proto), None, "champion", "challenger")
    assert first.alias == "champion" and first.champion_value is None
    better = decide_rescored(Score.of("fd_pixels", [2.5, 2.6], proto), champion, "champion", "challenger")
    assert better.alias == "champion" and better.champion_value == pytest.approx(3.1)
    assert "spread 0.2" in better.reason
    inside = decide_rescored(Score.of("fd_pixels", [2.95, 3.0], proto), champion, "champion", "challenger")
    assert inside.alias == "challenger" and "not better beyond the spread" in inside.reason  # 0.125 < 0.2
    tie = decide_rescored(Score.of("fd_pixels", [3.0, 3.2], proto), champion, "champion", "challenger")
    assert tie.alias == "challenger"
    one_seed = decide_rescored(Score.of("fd_pixels", [1.0], proto), champion, "champion", "challenger")
    assert one_seed.alias == "challenger" and ">= 2 seeds" in one_seed.reason
    higher = decide_rescored(Score.of("precision", [0.9, 0.91], proto), Score.of("precision", [0.8, 0.82], proto),
                             "champion", "challenger")
    assert higher.alias == "champion"
