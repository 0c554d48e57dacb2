"""`flowrail train model=dfm` and `model=SiT-S/2` through the real spine (Ray Train + DeepSpeed + MLflow) on digits."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_train_overrides
from pipeline.config import TrainJobConfig, load_config
from pipeline.models.dfm import DFM


def _losses(result) -> list[float]:  # noqa: ANN001
    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def test_dfm_trains_on_digits_and_makes_a_grid(ray_local, digits_shards, tmp_path) -> None:
    from pipeline.train.checkpoint import load_trained
    from pipeline.train.trainer import fit

    overrides = tiny_train_overrides(digits_shards, tmp_path, run_name="dfm", **{
        "model": "dfm", "data.image_size": 16, "model.dfm_stage_steps": "[6,2]", "train.steps": 30})
    # the stage steps fix DFM's sampling steps: sampler.steps from the tiny overrides would be refused
    overrides = [item for item in overrides if not item.startswith("sampler.steps=")]
    cfg = load_config(TrainJobConfig, "train", overrides)
    result = fit(cfg)
    losses = _losses(result)
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    assert result.grid is not None and result.grid.is_file()
    trained = load_trained(result.checkpoint)
    assert isinstance(trained.model, DFM) and trained.image_shape == (1, 16, 16)
    import torch

    out = trained.objective.sample(trained.model, {"label": torch.tensor([3])}, (1, 1, 16, 16))
    assert out.nfe == 8 and torch.isfinite(out.x).all()


@pytest.mark.slow
@pytest.mark.exhaustive  # CI: named sizes are built in test_models_sit.py and test_settings_honoured.py (SiT-S/8)
def test_named_sit_s2_trains_on_digits(ray_local, digits_shards, tmp_path) -> None:
    """The paper's SiT-S/2 (33M parameters) by name; a few small-batch steps keep it affordable on a CPU."""
    from pipeline.train.trainer import fit

    overrides = tiny_train_overrides(digits_shards, tmp_path, run_name="sits2", **{
        "model": "SiT-S/2", "data.image_size": 8, "data.batch_size": 16, "train.steps": 10, "train.log_every": 2,
        "train.checkpoint_every": 10, "train.lr": 3e-4, "sampler.steps": 2, "samples.per_class": 1})
    # a named size fixes the architecture: the custom-size keys of the tiny overrides would be refused
    custom = ("model.hidden_size=", "model.depth=", "model.num_heads=", "model.patch_size=")
    overrides = [item for item in overrides if not item.startswith(custom)]
    cfg = load_config(TrainJobConfig, "train", overrides)
    result = fit(cfg)
    losses = _losses(result)
    assert losses[-1] < losses[0], losses
    assert result.grid is not None and result.grid.is_file()
