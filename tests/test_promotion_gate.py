"""The fair promotion gate, end to end through ``register`` on a real MLflow store: the current champion and the
candidate are re-scored together (same seeds, samples and held-out reference half); a candidate better only by
chance (the same model, other weights noise) stays @challenger, a truly better one becomes @champion; a forced
champion is scored on registration."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.gate import GateSpec
from pipeline.promotion import Score, decide_rescored
from pipeline.sweep.evaluation import score_pair

SAMPLES, SEEDS = 96, (1, 2)


def _checkpoint(root, shards, name: str, edit) -> str:  # noqa: ANN001
    """A tiny SiT flowrail checkpoint on the digits shards; ``edit(model)`` sets its weights."""
    from safetensors.torch import save_file

    from pipeline.config import TrainJobConfig, load_config
    from pipeline.data.streaming import DataInfo
    from pipeline.models import build_model
    from pipeline.train.checkpoint import EMA_FILE, META

    cfg = load_config(TrainJobConfig, None, ["model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                                             "data.image_size=8", "sampler.steps=2", f"run_dir={root}",
                                             f"data.shards={shards / 'train'}", f"data.val_shards={shards / 'val'}"])
    info = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=1438)
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, input_size=8, num_classes=10)
    with torch.no_grad():
        edit(model)
    ckpt = root / name / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    save_file(model.state_dict(), str(ckpt / EMA_FILE))
    (ckpt / META).write_text(json.dumps({"format": "flowrail-checkpoint/1", "step": 1, "epoch": 0,
                                         "config": cfg.model_dump(mode="json"), "data": info.to_dict()}))
    return str(ckpt)


def _noise(seed: int, scale: float):  # noqa: ANN202
    def edit(model) -> None:  # noqa: ANN001
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return edit


def _towards_the_data(model) -> None:  # noqa: ANN001
    """Velocity = the data's mean pixel (-0.75 on digits): samples x0 + m, far closer to the data than x0."""
    final = model.final_layer.linear
    final.weight.zero_()
    final.bias.fill_(-0.75)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands here
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_the_gate_rescores_and_promotes_only_beyond_the_seeds_spread(digits_shards, tmp_path, store):
    from mlflow.tracking import MlflowClient

    from pipeline.registry import register

    champion = _checkpoint(tmp_path, digits_shards, "a", _noise(0, 0.05))
    # "the same model, trained with another seed": the champion's weights with a little noise; pick one whose mean
    # on the gate's own seeds is lower than the champion's (better by chance: a stored-number gate promotes it)
    lucky = None
    for k in range(1, 9):
        candidate = _checkpoint(tmp_path, digits_shards, f"b{k}", lambda m, k=k: (_noise(0, 0.05)(m),
                                                                                  _noise(k, 0.002)(m)))
        pair = score_pair(candidate, champion, "fd_pixels", SAMPLES, list(SEEDS))
        c, h = Score.of("fd_pixels", pair["candidate"], {}), Score.of("fd_pixels", pair["champion"], {})
        if c.value < h.value:
            lucky = candidate
            break
    assert lucky is not None, "no candidate better by chance among 8"
    assert decide_rescored(c, h, "champion", "challenger").alias == "challenger"  # not beyond the spread
    better = _checkpoint(tmp_path, digits_shards, "c", _towards_the_data)

    gate = GateSpec("fd_pixels", SAMPLES, SEEDS)
    first = register(champion, "gate-test", store, gate=gate)
    assert first.aliases[0] == "champion" and "first version" in first.reason
    chance = register(lucky, "gate-test", store, gate=gate)
    assert chance.aliases[0] == "challenger" and "not better beyond the spread" in chance.reason, chance.reason
    truly = register(better, "gate-test", store, gate=gate)
    assert truly.aliases[0] == "champion" and "better beyond the spread" in truly.reason, truly.reason

    c = MlflowClient(store)
    assert str(c.get_model_version_by_alias("gate-test", "champion").version) == str(truly.version)
    tags = c.get_model_version("gate-test", chance.version).tags
    values = json.loads(tags["flowrail.metric_values"])
    assert len(values) == 2 and float(tags["flowrail.metric_spread"]) == pytest.approx(max(values) - min(values))
    protocol = json.loads(tags["flowrail.protocol"])
    assert protocol["seeds"] == list(SEEDS) and protocol["num_samples"] == SAMPLES and protocol["split"] == "gate"
    assert len(protocol["reference_sha256"]) == 64  # the reference set by content, not only by path
    assert tags["flowrail.champion_metric_value"] != "none"  # the champion was re-scored beside it


def test_a_forced_champion_is_scored_and_rescored_later(digits_shards, tmp_path, store):
    from mlflow.tracking import MlflowClient

    from pipeline.registry import register

    forced_ckpt = _checkpoint(tmp_path, digits_shards, "forced", _noise(3, 0.05))
    forced = register(forced_ckpt, "forced-test", store, gate=GateSpec("fd_pixels", SAMPLES, SEEDS, force=True))
    tags = MlflowClient(store).get_model_version("forced-test", forced.version).tags
    assert forced.aliases[0] == "champion" and float(tags["flowrail.metric_value"]) > 0
    better = register(_checkpoint(tmp_path, digits_shards, "better", _towards_the_data), "forced-test", store,
                      gate=GateSpec("fd_pixels", SAMPLES, SEEDS))
    assert better.aliases[0] == "champion" and "re-scored" in better.reason


def test_selection_and_gate_use_disjoint_halves_of_the_validation_set():
    from pipeline.sweep.metric import reference_half

    images = torch.arange(10.0)[:, None]
    select, gate = reference_half(images, "select"), reference_half(images, "gate")
    assert not set(select.flatten().tolist()) & set(gate.flatten().tolist())
    assert len(select) + len(gate) == 10


def test_one_protocol_default_for_sweep_and_register():
    from jobs.register import _parser
    from pipeline.promotion import GATE_SAMPLES, GATE_SEEDS
    from pipeline.sweep.config import RegisterSettings

    args = _parser().parse_args(["ckpt", "--name", "n"])
    assert (args.eval_samples, tuple(args.eval_seeds)) == (GATE_SAMPLES, GATE_SEEDS)
    r = RegisterSettings()
    assert (r.gate_samples, tuple(r.gate_seeds)) == (GATE_SAMPLES, GATE_SEEDS)
    with pytest.raises(Exception, match=">= 2"):
        GateSpec("fd_pixels", 64, (1,)).check()


@pytest.mark.slow
def test_the_pair_is_scored_in_one_ray_task_like_in_process(ray_local, digits_shards, tmp_path):
    """The sweep's gate runs as one Ray task (its own CPUs/GPU): same numbers as in this process."""
    from pipeline.sweep.evaluation import score_pair_remotely

    a = _checkpoint(tmp_path, digits_shards, "a", _noise(0, 0.05))
    b = _checkpoint(tmp_path, digits_shards, "b", _towards_the_data)
    here = score_pair(b, a, "fd_pixels", 32, [1, 2])
    there = score_pair_remotely(b, a, "fd_pixels", 32, [1, 2], cpus=0.5, gpus=0)
    assert len(there["candidate"]) == len(there["champion"]) == 2
    for key in ("candidate", "champion"):
        assert there[key] == pytest.approx(here[key], rel=1e-5)


def test_fd_digits_selection_and_gate_score_against_disjoint_halves(digits_shards, tmp_path):
    """fd_digits (the digits default's metric) compares with its reference set's even half when a sweep selects and
    its odd half at the gate: the same samples (same seed) score differently against the two halves, and neither
    equals the score against the whole set."""
    from pipeline.sweep.metric import evaluate
    from pipeline.train.checkpoint import load_trained

    trained = load_trained(_checkpoint(tmp_path, digits_shards, "m", _towards_the_data))
    trained.config.eval.cache_dir = str(tmp_path / "cache")
    scores = {split: evaluate(trained, ["fd_digits"], 64, 1, split)["fd_digits"] for split in ("select", "gate", None)}
    assert len(set(scores.values())) == 3, scores
