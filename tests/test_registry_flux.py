"""FLUX LoRA handoff end to end: train a LoRA on the tiny FLUX model -> register -> a fresh process generates images
from the registered model (adapter + bundled prompts and autoencoder, base checked) -> the exported diffusers LoRA
loads into a diffusers ``FluxPipeline`` with ``load_lora_weights`` and changes its output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_flux_train import flux_data  # noqa: F401 - the tiny FLUX pipeline and its pre-encoded shard set

GENERATE = textwrap.dedent("""
    import json, sys
    import mlflow, pandas as pd
    from mlflow.models import get_model_info
    model = mlflow.pyfunc.load_model(sys.argv[1])
    images = model.predict(pd.DataFrame({"label": [0, 1, 1], "seed": [2, 2, 2], "steps": [3, 3, 3]}))
    spec = get_model_info(sys.argv[1]).signature.outputs.to_dict()[0]["tensor-spec"]["shape"]
    print(json.dumps({"shape": list(images.shape), "dtype": str(images.dtype), "spec": spec,
                      "caption_matters": bool((images[0] != images[1]).any())}))
""")


def _pipeline_image(pipe) -> "object":
    import torch

    return pipe(prompt="a red square", num_inference_steps=2, height=16, width=16, output_type="np",
                max_sequence_length=16, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_flux_lora_registered_generates_in_fresh_process_and_loads_into_diffusers(flux_data, ray_local,  # noqa: F811
                                                                                  tmp_path):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.registry import register
    from pipeline.train.trainer import fit

    pipe_dir, shards = flux_data
    overrides = {"model": "flux", "run_name": "flux-reg", "run_dir": str(tmp_path / "runs"), "data.shards": str(shards),
                 "data.val_shards": None, "data.image_size": None, "data.batch_size": 16, "flux.weights": str(pipe_dir),
                 "flux.mode": "lora", "flux.lora_rank": 4, "train.zero_stage": 2, "train.num_workers": 1,
                 "train.cpus_per_worker": 0.5, "train.steps": 6, "train.log_every": 3, "train.checkpoint_every": 6,
                 "train.lr": 3e-2, "sampler.steps": 3, "tracking.experiment": "flux-reg"}
    cfg = load_config(TrainJobConfig, "train", [f"{k}={'null' if v is None else v}" for k, v in overrides.items()])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.tracking.tracking_uri = uri
    MlflowClient(uri).create_experiment("flux-reg", artifact_location=str(tmp_path / "artifacts"))  # not ./mlruns
    result = fit(cfg, make_grid=False)
    reg = register(result.checkpoint, "flux-lora", uri, run_id=result.run_id, aliases=["champion"])
    c = MlflowClient(uri)
    version = c.get_model_version(reg.name, reg.version)
    assert version.tags["flowrail.family"] == "flux"
    reqs = Path(c.download_artifacts(reg.run_id, "model/requirements.txt", str(tmp_path))).read_text()
    assert all(f"{p}==" in reqs for p in ("diffusers", "transformers", "peft"))

    proc = subprocess.run([sys.executable, "-c", GENERATE, "models:/flux-lora@champion"], cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [3, 16, 16, 3] and out["dtype"] == "uint8" and out["spec"] == [-1, 16, 16, 3]
    assert out["caption_matters"]

    lora = Path(c.download_artifacts(reg.run_id, "model/artifacts/flux_lora", str(tmp_path / "dl")))
    pipe = FluxPipeline.from_pretrained(str(pipe_dir), scheduler=FlowMatchEulerDiscreteScheduler(),
                                        local_files_only=True)
    pipe.tokenizer.model_max_length = pipe.tokenizer_max_length = 77  # the tiny word-level tokenizers set none
    pipe.tokenizer_2.model_max_length = 16
    before = _pipeline_image(pipe)
    pipe.load_lora_weights(str(lora))
    after = _pipeline_image(pipe)
    assert before.shape == after.shape == (1, 16, 16, 3)
    assert np.abs(after - before).max() > 1e-3, "the exported LoRA did not change the pipeline's output"


def test_flux_base_reference_is_checked_at_load(tmp_path, monkeypatch):
    """A FLUX model loads only against the base it was fine-tuned from: a missing or different base is one line."""
    from pipeline.errors import FlowrailError
    from pipeline.flux.tiny import write_tiny_flux_pipeline
    from pipeline.registry import BASE_ENV, check_flux_base, flux_base_reference

    base = write_tiny_flux_pipeline(tmp_path / "base", ["a b"])
    other = write_tiny_flux_pipeline(tmp_path / "other", ["a b"], guidance_embeds=False)
    ref = flux_base_reference({"flux": {"weights": str(base)}})
    assert check_flux_base(ref) == base
    monkeypatch.setenv(BASE_ENV, str(other))
    with pytest.raises(FlowrailError, match="not the ones this model was fine-tuned from"):
        check_flux_base(ref)
    monkeypatch.setenv(BASE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FlowrailError, match=f"set {BASE_ENV}"):
        check_flux_base(ref)
