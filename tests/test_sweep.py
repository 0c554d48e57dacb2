"""Sweep configuration, search space and summary ranking (no Ray needed)."""
from __future__ import annotations

import math

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.sweep.config import load_sweep_config, nest, trial_config
from pipeline.sweep.space import grid_size, tune_space
from pipeline.sweep.summary import Row, rank_rows, write_summary


def _write(tmp_path, data) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_shipped_sweep_config_is_valid_and_fits_two_cores():
    cfg = load_sweep_config("sweep")
    assert grid_size(cfg.space) == 4 and len(cfg.sampling.configs) + cfg.sampling.num_samples >= 4 and cfg.sampling.space
    from pipeline.sweep.config import base_train_config

    base = base_train_config(cfg)
    assert base.train.num_workers * base.train.cpus_per_worker * cfg.tune.max_concurrent < 2  # CPU left for Ray Data
    assert cfg.tune.metric in cfg.eval.metrics and cfg.registry.enabled


def test_space_becomes_tune_distributions():
    from ray.tune.search.sample import Categorical, Float

    space = tune_space({"transport.path": {"grid": ["linear", "gvp"]}, "train.lr": {"loguniform": [1e-4, 1e-2]},
                        "model.hidden_size": {"choice": [32, 64]}})
    assert space["transport.path"] == {"grid_search": ["linear", "gvp"]}
    assert isinstance(space["train.lr"], Float) and space["train.lr"].lower == 1e-4
    assert isinstance(space["model.hidden_size"], Categorical)


def test_trial_config_applies_dotted_params_and_validates():
    cfg = load_sweep_config("sweep")
    from pipeline.sweep.config import base_train_config

    base = base_train_config(cfg)
    trial = trial_config(base, {"transport.path": "gvp", "train.lr": 0.01, "model.hidden_size": 64}, run_name="t1")
    assert (trial.transport.path, trial.train.lr, trial.model.hidden_size, trial.run_name) == ("gvp", 0.01, 64, "t1")
    assert trial.model.depth == base.model.depth == 2  # sweep overrides kept
    with pytest.raises(ConfigError, match="transport.path"):
        trial_config(base, {"transport.path": "curvy"})
    assert nest({"a.b": 1, "c": {"d.e": 2}}) == {"a": {"b": 1}, "c": {"d": {"e": 2}}}


@pytest.mark.parametrize("data, message", [
    ({"space": {"transport.pth": {"grid": ["linear"]}}}, "unknown key 'transport.pth'"),
    ({"space": {"train.lr": {"normal": [0, 1]}}}, "space.train.lr must be one of"),
    ({"space": {"train.lr": {"loguniform": [1e-3]}}}, r"space.train.lr.loguniform takes \[low, high\]"),
    ({"space": {"transport.path": {"grid": ["linear"]}}, "tune": {"searcher": "optuna"}}, "use choice"),
    ({"tune": {"metric": "fid"}}, "tune.metric=fid must be one of eval.metrics"),
    ({"tune": {"max_concurent": 1}}, "unknown key 'tune.max_concurent'"),
    ({"overrides": {"train.stepz": 3}}, "unknown key 'train.stepz'"),
])
def test_bad_sweep_config_is_one_line_naming_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_sweep_config(_write(tmp_path, data))
    assert "\n" not in str(info.value)


def test_sampling_variant_resolves_against_the_trial_sampler(tmp_path):
    cfg = load_sweep_config(_write(tmp_path, {"sampling": {"configs": [
        {"sampler": {"method": "sde", "steps": 9}, "guidance": {"scale": 2}},
        {"name": "bad", "sampler": {"method": "sde", "solver": "rk4"}}]}}))
    from pipeline.sweep.config import base_train_config

    base = base_train_config(cfg)
    sampler, guidance = cfg.sampling.configs[0].resolve(base)
    assert (sampler.method, sampler.steps, sampler.solver, guidance.scale) == ("sde", 9, base.sampler.solver, 2.0)
    assert cfg.sampling.configs[0].label == "method=sde,steps=9,cfgscale=2"
    with pytest.raises(ConfigError, match="sampling variant bad: sampler.solver=rk4 is not an SDE solver"):
        cfg.sampling.configs[1].resolve(base)


def _row(trial, metric, status="completed", kind="trial"):
    return Row(kind=kind, trial_id=trial, run_id=f"run-{trial}-{kind}", params={"transport.path": trial},
               sampler="trained", metric=metric, status=status, step=30)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_summary_ranks_completed_rows_and_leaves_stopped_unranked(tmp_path, mode, capsys):
    rows = [_row("a", 3.0), _row("b", 1.0, "stopped"), _row("c", 2.0), _row("a", 0.5, kind="sampling"),
            _row("d", math.nan)]
    ranked = rank_rows(rows, "fd_pixels", mode)
    order = [(r.trial_id, r.kind) for r in ranked if r.rank]
    expected = [("a", "sampling"), ("c", "trial"), ("a", "trial")]
    assert order == (expected if mode == "min" else expected[::-1])
    assert [r.rank for r in ranked[:3]] == [1, 2, 3] and all(r.rank is None for r in ranked[3:])
    csv = write_summary(ranked, tmp_path / "summary.csv", "fd_pixels")
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("rank,kind,trial,sampler,fd_pixels") and lines[1].startswith("1,")
    assert "stopped" in capsys.readouterr().out


def test_sweep_cli_missing_config_exits_2(tmp_path, capsys):
    from jobs.cli import main

    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "sweep config file not found" in capsys.readouterr().err


def test_evals_and_sweep_join_ray_through_pipeline_cluster_not_the_trainer():
    """evals sits below training (periodic evaluation imports it): nothing in evals/ or the sweep's metric path may
    import pipeline.train.trainer, else train -> periodic eval -> evals -> train is a circle."""
    import ast
    from pathlib import Path

    import pipeline.cluster
    import pipeline.train.trainer as trainer

    assert trainer.init_ray is pipeline.cluster.init_ray  # still importable from the trainer (re-export)
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*(root / "evals").glob("*.py"), root / "pipeline" / "sweep" / "metric.py",
                 root / "pipeline" / "sweep" / "evaluation.py", root / "pipeline" / "cluster.py"]:
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline.train.trainer"):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


SAMPLER_SPACE = {"sampler.method": {"choice": ["ode", "sde"]}, "sampler.solver": {"choice": ["euler", "heun", "rk4"]},
                 "sampler.steps": {"randint": [2, 9]}, "sampler.diffusion": {"choice": ["sigma", "linear", "sbdm"]},
                 "sampler.diffusion_norm": {"uniform": [0.1, 2.0]}, "guidance.scale": {"uniform": [1.0, 3.0]},
                 "guidance.t_min": {"uniform": [0.0, 0.3]}, "guidance.t_max": {"uniform": [0.7, 1.0]}}


def test_sampling_space_is_searched_by_tpe_and_learns_from_scores(tmp_path):
    """The TPE searcher draws every key of the space inside its range, refuses invalid combinations (SDE with an
    ODE-only solver) without scoring them, and after being told low scores concentrates around them."""
    from pipeline.sweep.config import base_train_config
    from pipeline.sweep.sampling import candidates

    cfg = load_sweep_config(_write(tmp_path, {"sampling": {
        "space": SAMPLER_SPACE, "num_samples": 30, "searcher": "optuna",
        "configs": [{"name": "fixed", "sampler": {"method": "ode", "solver": "heun", "steps": 4, "diffusion": "sigma",
                                                  "diffusion_norm": 1.0},
                     "guidance": {"scale": 2.0, "t_min": 0.1, "t_max": 0.9}}]}}))
    base = base_train_config(cfg)
    drawn = []
    for label, sampler, guidance, tell in candidates(cfg, base.sampler.model_dump(), base.guidance.model_dump()):
        assert sampler["method"] != "sde" or sampler["solver"] in ("euler", "heun")
        assert 2 <= sampler["steps"] <= 8 and 0.1 <= sampler["diffusion_norm"] <= 2.0 or label == "fixed"
        assert guidance["t_min"] <= guidance["t_max"]
        drawn.append((label, sampler, guidance))
        tell(abs(guidance["scale"] - 1.2) + abs(sampler["diffusion_norm"] - 0.3))  # a score with a clear optimum
    assert drawn[0][0] == "fixed" and drawn[0][1]["steps"] == 4
    searched = drawn[1:]
    assert 10 <= len(searched) <= 30  # rk4 with sde is pruned, not scored
    assert len({s["diffusion"] for _, s, _ in searched}) >= 2 and len({s["method"] for _, s, _ in searched}) == 2
    first, last = searched[:8], searched[-8:]
    err = lambda rows: sum(abs(g["scale"] - 1.2) + abs(s["diffusion_norm"] - 0.3) for _, s, g in rows) / len(rows)
    assert err(last) < err(first)  # TPE moved towards the optimum it was told about


@pytest.mark.parametrize("space, message", [
    ({"sampler.stepz": {"randint": [2, 9]}}, "unknown key 'sampling.space.sampler.stepz'"),
    ({"model.depth": {"choice": [1, 2]}}, "unknown key 'sampling.space.model.depth'"),
    ({"sampler.diffusion_norm": {"uniform": [2.0, 0.5]}}, "empty range"),
    ({"sampler.steps": {"randint": [4, 4]}}, "empty range"),
    ({"guidance.scale": {"choice": []}}, "non-empty list"),
])
def test_bad_sampling_space_is_one_line(tmp_path, space, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_sweep_config(_write(tmp_path, {"sampling": {"space": space}}))
    assert "\n" not in str(info.value)


def test_training_space_empty_range_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"space.train.lr.loguniform: empty range"):
        load_sweep_config(_write(tmp_path, {"space": {"train.lr": {"loguniform": [1e-2, 1e-3]}}}))


def test_resume_unknown_sweep_is_one_line_exit_2(tmp_path, capsys):
    from jobs.cli import main

    (tmp_path / "sweeps" / "other").mkdir(parents=True)
    (tmp_path / "sweeps" / "other" / "sweep.json").write_text("{}")
    assert main(["sweep", "--resume", "nope", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--resume nope: no sweep of that name" in err and "known: other" in err


def test_resume_refuses_another_tracking_store(tmp_path):
    from pipeline.sweep.state import check_same_store, load_state, save_state

    cfg = load_sweep_config(_write(tmp_path, {"name": "s1"}))
    (tmp_path / "tune").mkdir()
    path = save_state(tmp_path, cfg, "parent123", tmp_path / "tune", "http://user:pw-123@host:5000")
    assert "pw-123" not in path.read_text()
    state = load_state(tmp_path, "s1")
    assert state.parent_run_id == "parent123" and state.config["name"] == "s1"
    check_same_store(state, "http://user:pw-123@host:5000")
    with pytest.raises(ConfigError, match=r"tracked at http://\*\*\*@host:5000") as info:
        check_same_store(state, "http://host:5001")
    assert "pw-123" not in str(info.value)
