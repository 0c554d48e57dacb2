"""A flow-map checkpoint registered as an MLflow pyfunc generator (real MLflow server): `steps` per row picks the
number of flow-map jumps, and the images equal flowrail's own few-step sampler."""
from __future__ import annotations

import json

import torch


def make_flow_map_checkpoint(root):  # noqa: ANN001, ANN201
    """A flowrail checkpoint's sampling part (flowrail.json + ema.safetensors) for a tiny flow-map SiT."""
    from safetensors.torch import save_file

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.data.streaming import DataInfo
    from pipeline.models import build_model
    from pipeline.train.checkpoint import EMA_FILE, META

    cfg = load_config(TrainJobConfig, "train", [
        "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "data.image_size=8", f"run_dir={root}",
        "objective.name=flow_map", "flow_map.decoupled_blocks=1", "sampler.method=flow_map", "sampler.steps=1"])
    info = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=100)
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, input_size=8, num_classes=10, flux_cfg=cfg.flux)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = root / "checkpoint_000001"
    ckpt.mkdir()
    save_file(model.state_dict(), str(ckpt / EMA_FILE))
    (ckpt / META).write_text(json.dumps({"format": "flowrail-checkpoint/1", "step": 5, "epoch": 0,
                                         "config": cfg.model_dump(mode="json"), "data": info.to_dict()}))
    return ckpt


def test_registered_flow_map_generator_takes_steps(mlflow_server, tmp_path):
    import mlflow
    import pandas as pd

    from pipeline.images import to_uint8
    from pipeline.registry import register
    from pipeline.sampling import sample_classes
    from pipeline.sweep.metric import with_sampler
    from pipeline.train.checkpoint import load_trained

    ckpt = make_flow_map_checkpoint(tmp_path)
    reg = register(ckpt, "flowrail-flow-map-test", mlflow_server, aliases=["champion"])
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/flowrail-flow-map-test@champion")
    frame = pd.DataFrame({"label": [2, 7, 2, 7], "seed": [5] * 4, "steps": [1, 1, 3, 3]})
    images = model.predict(frame)
    assert images.shape == (4, 8, 8, 1) and images.dtype.name == "uint8"
    trained = load_trained(ckpt)
    for rows, steps in (([0, 1], 1), ([2, 3], 3)):
        view = with_sampler(trained, trained.config.sampler.model_copy(update={"steps": steps}), trained.config.guidance)
        out = sample_classes(view, torch.tensor([2, 7]), 5)
        assert out.nfe == steps
        assert (images[rows] == to_uint8(out.x)).all()
    assert (images[[0, 1]] != images[[2, 3]]).any()  # 1 and 3 jumps are different generators
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_model_version("flowrail-flow-map-test", reg.version).tags["sampler.method"] == "flow_map"
