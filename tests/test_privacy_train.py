"""SFBD flow as a Ray Train + DeepSpeed job: 2 workers, the denoised pool refreshes, MLflow holds it; audit runs."""
from __future__ import annotations

import shutil

import pytest

from pipeline.config import load_config
from privacy.boundary import mark_sensitive
from privacy.config import PrivacyTrainConfig
from privacy.release import release

SECRET = b"test secret for the privacy stage, 256+ bits"


@pytest.fixture(scope="module")
def released(digits_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy")
    sensitive = root / "sensitive"
    shutil.copytree(digits_shards / "train", sensitive)  # a copy: the shared digits set stays public
    mark_sensitive(sensitive)
    from pipeline.data.shards import iter_samples

    keys = [k for k, _ in iter_samples(sensitive)]
    (sensitive / "consent.txt").write_text("\n".join(keys[::10]) + "\n")  # 10%, inside the fence
    out = release(sensitive, root / "release", 0.59, secret=SECRET, consent_list=sensitive / "consent.txt",
                  release_labels=True, samples_per_shard=256)
    return root, sensitive, out


def _cfg(root, release_dir, **extra):
    base = {"run_dir": str(root / "runs"), "privacy.release": str(release_dir), "data.batch_size": 32,
            "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.patch_size": 2,
            "train.steps": 30, "train.log_every": 5, "train.checkpoint_every": 30, "train.lr": 2e-3,
            "sampler.steps": 4, "samples.per_class": 1, "privacy.warmup_steps": 10, "privacy.refresh_every": 5,
            "privacy.refresh_size": 16, "privacy.denoise_steps": 3, "privacy.ramp_end": 20}
    base.update(extra)
    return load_config(PrivacyTrainConfig, None, [f"{k}={v}" for k, v in base.items()])


@pytest.mark.slow
def test_sfbd_flow_trains_on_two_workers_and_refreshes_its_pool(ray_local, released):
    from mlflow.tracking import MlflowClient

    from privacy.audit_run import audit_checkpoint
    from privacy.train import fit_privacy

    root, sensitive, out = released
    cfg = _cfg(root, out.out_dir, run_name="flow", **{"train.num_workers": 2, "train.zero_stage": 2})
    result = fit_privacy(cfg, make_grid=False)
    m = result.metrics
    assert m["step"] == 30
    # refreshes at steps 10 (whole slice), 15, 20, 25 on each worker; each refresh changed reconstructions
    assert m["pool_refreshes"] == 4 and m["pool_change"] > 0 and m["denoised_weight"] == 1.0
    assert m["denoise_nfe"] == 6  # Heun, 3 steps
    client = MlflowClient(result.tracking_uri)
    history = [x.value for x in client.get_metric_history(result.run_id, "pool_refreshes")]
    assert history[0] == 0 and history[-1] == 4 and history == sorted(history)
    weights = [x.value for x in client.get_metric_history(result.run_id, "denoised_weight")]
    assert weights[0] == 0.0 and 0 < weights[2] < 1 and weights[-1] == 1.0
    params = client.get_run(result.run_id).data.params
    assert params["privacy.method"] == "sfbd_flow" and params["privacy.noise_std"] == "0.59"
    assert not any(SECRET.decode() in v for v in params.values())

    report = audit_checkpoint(result.checkpoint, sensitive, release=out.out_dir, num_samples=40, features="pixels",
                             denoise_steps=3)
    assert report["feature_space"] == "pixels" and 0 <= report["gen_extracted_frac"] <= 1
    assert report["pool_recon_own_l2_mean"] > 0 and report["noisy_recon_own_l2_mean"] > 0
    logged = client.get_run(result.run_id).data.metrics
    assert "audit_gen_extracted_frac" in logged and "audit_pool_recon_reid_frac" in logged


def test_privacy_train_refuses_sensitive_sets_and_bad_settings(ray_local, released):
    from privacy.train import fit_privacy

    root, sensitive, out = released
    with pytest.raises(PermissionError, match="sensitive shard set"):
        fit_privacy(_cfg(root, out.out_dir, **{"privacy.clean_shards": str(sensitive)}))
    with pytest.raises(ValueError, match="data.image_size=16"):
        fit_privacy(_cfg(root, out.out_dir, **{"data.image_size": 16}))
    with pytest.raises(ValueError, match="warmup_steps"):
        fit_privacy(_cfg(root, out.out_dir, **{"privacy.warmup_steps": 30}))
