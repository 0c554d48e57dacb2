"""One sampler resolution on every path: a preset sets its fields, a key given now wins over it, and a checkpoint's
stored sampler never overrides a preset given now (train, evaluate, sweep overrides / space / variants, register,
the pyfunc)."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import SAMPLER_PRESETS, ConfigError, TrainJobConfig, load_config, resolve_sampler


def _sde_trained() -> dict:
    """What a ``sampler.preset=sit_sde`` training run stores in its checkpoints: the full, expanded config."""
    cfg = load_config(TrainJobConfig, None, ["sampler.preset=sit_sde", "model.hidden_size=32", "model.depth=1",
                                             "model.num_heads=2"])
    assert cfg.sampler.method == "sde" and cfg.sampler.steps == 249
    return cfg.model_dump(mode="json")


class TimeRecorder(torch.nn.Module):
    """The model, recording the times it is evaluated at."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.times = model, []

    def forward(self, x, t, y=None):  # noqa: ANN001, ANN201
        self.times.append(float(t.flatten()[0]))
        return self.model(x, t, y)


def _sample_times(cfg: TrainJobConfig) -> tuple[list[float], int]:
    from pipeline.models import build_model
    from pipeline.objective import build_objective

    torch.manual_seed(0)
    model = TimeRecorder(build_model(cfg.model, in_channels=1, input_size=4, num_classes=3)).eval()
    out = build_objective(cfg, 3).sample(model, {"label": torch.tensor([0, 1])}, (2, 1, 4, 4),
                                         torch.Generator().manual_seed(0))
    return model.times, out.nfe


def test_evaluating_an_sde_checkpoint_with_the_ode_preset_runs_the_ode():
    from jobs.evaluate import eval_config

    cfg = eval_config(_sde_trained(), ["sampler.preset=sit_ode"])
    assert (cfg.sampler.method, cfg.sampler.solver, cfg.sampler.preset) == ("ode", "dopri5", "sit_ode")
    times, nfe = _sample_times(cfg)
    # dopri5 on [0, 1]: adaptive times (6 evaluations per step, reaching t = 1), not Euler-Maruyama's 249-step grid
    # on [0, 0.96] plus the mean last step (250 evaluations)
    assert nfe == len(times) and nfe % 6 in (0, 1, 2) and nfe < 200, nfe
    assert max(times) == pytest.approx(1.0) and not any(abs(t - 0.96) < 1e-9 for t in times)
    sde_cfg = eval_config(_sde_trained(), [])
    sde_times, sde_nfe = _sample_times(sde_cfg)
    assert sde_nfe == 250 and max(sde_times) < 1.0


def test_a_key_given_now_wins_over_the_preset_given_now():
    from jobs.evaluate import eval_config

    cfg = eval_config(_sde_trained(), ["sampler.preset=sit_ode", "sampler.solver=heun", "sampler.steps=5"])
    assert (cfg.sampler.method, cfg.sampler.solver, cfg.sampler.steps) == ("ode", "heun", 5)
    times, nfe = _sample_times(cfg)
    assert nfe == 10  # Heun: 2 evaluations per step
    # and without a preset given now the stored sampler stands, with the keys given now
    kept = eval_config(_sde_trained(), ["sampler.steps=20"])
    assert (kept.sampler.method, kept.sampler.steps) == ("sde", 20)


def test_every_path_resolves_the_preset_the_same_way(tmp_path):
    stored = _sde_trained()
    expected = {**stored["sampler"], **SAMPLER_PRESETS["sit_ode"]["sampler"], "preset": "sit_ode"}
    # sweep variants, the sampling search space, scoring, register and the pyfunc all call resolve_sampler
    s, g = resolve_sampler(stored["sampler"], stored["guidance"], {"preset": "sit_ode"})
    assert s.model_dump() == expected and g.channels == 3
    from pipeline.sweep.config import SamplingVariant, trial_config

    variant = SamplingVariant(sampler={"preset": "sit_ode"})
    assert variant.resolve_dicts(stored["sampler"], stored["guidance"])[0] == expected
    assert variant.resolve(TrainJobConfig.model_validate(stored))[0].model_dump() == expected
    # a sweep override (or a search-space key) naming a preset over a base config
    trial = trial_config(TrainJobConfig.model_validate(stored), {"sampler.preset": "sit_ode"})
    assert trial.sampler.model_dump() == expected
    # training: a preset on the command line beats the sampler keys of the YAML file
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps({"sampler": {"method": "ode", "solver": "heun", "steps": 8}}))
    cfg = load_config(TrainJobConfig, str(path), ["sampler.preset=sit_sde", "sampler.steps=100"])
    assert (cfg.sampler.method, cfg.sampler.solver, cfg.sampler.steps) == ("sde", "euler", 100)


def test_the_pyfunc_resolves_a_preset_over_the_stored_sampler():
    from types import SimpleNamespace

    from pipeline.registry import FlowrailImageModel

    model = FlowrailImageModel(sampler={"preset": "sit_ode"})
    model.trained = SimpleNamespace(config=TrainJobConfig.model_validate(_sde_trained()))
    sampler, guidance, _ = model._settings({"steps": None})
    assert (sampler.method, sampler.solver, guidance.channels) == ("ode", "dopri5", 3)


def test_unknown_preset_is_one_line_exit_2(capsys, tmp_path):
    from jobs.cli import main

    with pytest.raises(ConfigError, match=r"^config error: sampler.preset=sit_fast is unknown"):
        resolve_sampler({}, {}, {"preset": "sit_fast"})
    assert main(["train", "sampler.preset=sit_fast", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "sampler.preset=sit_fast" in err, err


def test_sampler_line_names_the_resolved_sampler():
    from pipeline.config import sampler_line

    s, g = resolve_sampler(_sde_trained()["sampler"], _sde_trained()["guidance"], {"preset": "sit_ode"})
    line = sampler_line(s, g)
    assert "preset=sit_ode method=ode solver=dopri5" in line and "atol=1e-06" in line and "steps" not in line
