"""The sweep configuration: base training config + search space + Tune settings + sampling sweep + registration.

Example (``jobs/configs/sweep.yaml``)::

    name: digits-sweep
    base: train                       # a config name in jobs/configs/ or a YAML path
    overrides: {train.steps: 300}     # dotted or nested training overrides applied to every trial
    space:
      transport.path: {grid: [linear, gvp]}
      train.lr: {loguniform: [3.0e-4, 3.0e-3]}
    tune: {metric: fd_pixels, mode: min, num_samples: 1, max_concurrent: 2,
           asha: {grace_period: 100, reduction_factor: 2}}
    sampling: {top_k: 2, configs: [{sampler: {method: ode, solver: heun, steps: 8}}, ...]}
    registry: {enabled: true, name: flowrail-digits}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.config import (CONFIG_DIR, ConfigError, GuidanceConfig, SamplerConfig, Section, TrainJobConfig,
                             deep_merge, format_validation_error, layer_sampler, load_config, parse_overrides,
                             resolve_sampler)
from pipeline.errors import first_line
from pipeline.promotion import GATE_SAMPLES, GATE_SEEDS

DISTRIBUTIONS = ("grid", "choice", "loguniform", "uniform", "randint")


class AshaSettings(Section):
    """Asynchronous successive halving on ``tune.metric``; rungs at ``grace_period * reduction_factor**k`` steps."""

    enabled: bool = True
    grace_period: int = Field(default=100, ge=1)  # training steps before a trial can be stopped
    reduction_factor: float = Field(default=2.0, gt=1)


class TuneSettings(Section):
    metric: str = "fd_pixels"  # an evaluation metric computed on each checkpoint (see pipeline/sweep/metric.py)
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(default=1, ge=1)  # repeats of the grid (or samples from random/Optuna spaces)
    max_concurrent: int = Field(default=2, ge=1)
    trial_cpus: float = Field(default=0.01, gt=0)  # the trial driver itself (it mostly waits); its workers ask for their own
    searcher: Literal["basic", "optuna"] = "basic"
    seed: int = 0
    asha: AshaSettings = AshaSettings()


class EvalSettings(Section):
    """How each checkpoint (and each sampler configuration) is scored."""

    metrics: list[str] = ["fd_pixels"]
    num_samples: int = Field(default=256, ge=8)
    seed: int = 1234
    cpus: float = Field(default=0.5, gt=0)  # CPUs of the Ray task that scores a checkpoint (plus 1 GPU on GPU runs)


class SamplingVariant(Section):
    """One evaluation-time sampler configuration applied to the best trials' checkpoints."""

    name: str | None = None
    sampler: dict[str, Any] = {}
    guidance: dict[str, Any] = {}

    def resolve(self, cfg: TrainJobConfig) -> tuple[SamplerConfig, GuidanceConfig]:
        """The trial's sampler/guidance settings with this variant's keys replaced."""
        return resolve_sampler(cfg.sampler.model_dump(), cfg.guidance.model_dump(), self.sampler, self.guidance,
                               where=f"sampling variant {self.label}")

    def resolve_dicts(self, sampler: dict[str, Any], guidance: dict[str, Any]) -> tuple[dict, dict]:
        """Like :meth:`resolve`, on dumped settings (a checkpoint's ``config.sampler``/``config.guidance``)."""
        s, g = resolve_sampler(sampler, guidance, self.sampler, self.guidance, where=f"sampling variant {self.label}")
        return s.model_dump(), g.model_dump()

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = [f"{k}={v}" for k, v in {**self.sampler, **{f"cfg{k}": v for k, v in self.guidance.items()}}.items()]
        return ",".join(parts) or "default"


class SamplingSweep(Section):
    """A search over evaluation-time sampling choices on the checkpoints of the ``top_k`` best trials.

    ``configs`` are evaluated as given; ``space`` (dotted ``sampler.*`` / ``guidance.*`` keys, the distributions of
    ``space`` above) is then searched with ``searcher`` for ``num_samples`` more configurations per checkpoint:
    Optuna's TPE, or random sampling. Each evaluated configuration is a nested MLflow run.
    """

    top_k: int = Field(default=2, ge=1)  # best trials whose checkpoints get the sampling sweep
    configs: list[SamplingVariant] = []
    space: dict[str, dict[str, Any]] = {}
    searcher: Literal["optuna", "random"] = "optuna"
    num_samples: int = Field(default=8, ge=0)  # searched configurations per checkpoint (besides ``configs``)
    seed: int = 0

    @model_validator(mode="after")
    def _sampler_keys(self) -> "SamplingSweep":
        for key, spec in self.space.items():
            section, _, field = key.partition(".")
            schema = {"sampler": SamplerConfig, "guidance": GuidanceConfig}.get(section)
            if schema is None or field not in schema.model_fields:
                raise ValueError(f"unknown key 'sampling.space.{key}' (sampler.<field> or guidance.<field>)")
            check_distribution(f"sampling.space.{key}", spec, grid_ok=False)
        return self


class RegisterSettings(Section):
    """Registration of the best row through the promotion gate (:mod:`pipeline.promotion`): it and the current
    champion are re-scored on ``tune.metric`` with ``gate_samples`` samples for each of ``gate_seeds`` (the one
    protocol default, shared with ``flowrail register``) on the held-out half of the validation set."""

    enabled: bool = False
    name: str = "flowrail-digits"
    champion_alias: str = "champion"
    challenger_alias: str | None = "challenger"
    gate_samples: int = Field(default=GATE_SAMPLES, ge=2)
    gate_seeds: list[int] = Field(default_factory=lambda: list(GATE_SEEDS), min_length=2)


class SweepConfig(Section):
    name: str = "sweep"
    base: str = "train"
    overrides: dict[str, Any] = {}
    space: dict[str, dict[str, Any]] = {}
    tune: TuneSettings = TuneSettings()
    eval: EvalSettings = EvalSettings()
    sampling: SamplingSweep = SamplingSweep()
    registry: RegisterSettings = RegisterSettings()

    @model_validator(mode="after")
    def _space_entries(self) -> "SweepConfig":
        for key, spec in self.space.items():
            check_distribution(f"space.{key}", spec, grid_ok=self.tune.searcher != "optuna")
        if self.tune.metric not in self.eval.metrics:
            raise ValueError(f"tune.metric={self.tune.metric} must be one of eval.metrics={self.eval.metrics}")
        if self.eval.seed in self.registry.gate_seeds:  # the gate's numbers must not be the selection's
            raise ValueError(f"eval.seed={self.eval.seed} is one of registry.gate_seeds={self.registry.gate_seeds}: "
                             "the promotion gate scores with seeds the sweep did not select on")
        return self


def check_distribution(where: str, spec: Any, grid_ok: bool = True) -> None:
    """One ``{kind: values}`` entry of a search space: a known kind, a non-empty list, ``[low, high]`` with
    ``low < high`` for ranges (``randint`` draws from ``[low, high)``)."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ValueError(f"{where} must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}.{kind} must be a non-empty list")
    if kind in ("loguniform", "uniform", "randint"):
        if len(values) != 2:
            raise ValueError(f"{where}.{kind} takes [low, high], got {values}")
        if not all(isinstance(v, (int, float)) for v in values) or not values[0] < values[1]:
            raise ValueError(f"{where}.{kind}: empty range {values} (needs numbers with low < high)")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"{where}.loguniform: low must be > 0, got {values[0]}")
    if kind == "grid" and not grid_ok:
        raise ValueError(f"{where}: grid is not supported with the optuna searcher (use choice)")


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "c": {"d.e": 2}}`` -> ``{"a": {"b": 1}, "c": {"d": {"e": 2}}}`` (values kept as they are)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = str(key).split(".")
        value = nest(value) if isinstance(value, dict) else value
        out = deep_merge(out, _path_dict(parts, value))
    return out


def _path_dict(parts: list[str], value: Any) -> dict[str, Any]:
    node: Any = value
    for part in reversed(parts):
        node = {part: node}
    return node


def load_sweep_config(name_or_path: str, overrides: list[str] | None = None, base: Path | None = None) -> SweepConfig:
    """Load a sweep YAML (``jobs/configs/<name>.yaml`` or a path) with dotted ``key=value`` overrides
    (``tune.max_concurrent=1``, ``overrides.train.steps=50``, ...)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"sweep config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep config {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep config {path} must hold a mapping at the top level")
    data["overrides"] = nest(data.get("overrides") or {})
    data = deep_merge(data, parse_overrides(overrides or []))
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, SweepConfig)) from None
    if Path(cfg.base).suffix and not Path(cfg.base).is_absolute() and (path.parent / cfg.base).is_file():
        cfg.base = str((path.parent / cfg.base).resolve())
    base_train_config(cfg, base)  # validates the overrides and every key of the search space now
    return cfg


def base_train_config(cfg: SweepConfig, base: Path | None = None) -> TrainJobConfig:
    """The training config every trial starts from (base YAML + overrides), paths made absolute."""
    train_cfg = load_config(TrainJobConfig, cfg.base, None, base)
    train_cfg = trial_config(train_cfg, cfg.overrides, where="overrides")
    train_cfg.resolve_paths(base)
    for key, spec in cfg.space.items():  # every dotted key must exist and accept its first value
        first = next(iter(spec.values()))[0]
        trial_config(train_cfg, {key: first})
    return train_cfg


def trial_config(base: TrainJobConfig, params: dict[str, Any], run_name: str | None = None,
                 where: str = "space") -> TrainJobConfig:
    """``base`` with the dotted ``params`` applied (validated like any override)."""
    data = layer_sampler(base.model_dump(mode="json"), nest(params))  # a sampler.preset here beats the base's keys
    if run_name:
        data["run_name"] = run_name
    try:
        return TrainJobConfig.model_validate(data)
    except ValidationError as err:
        msg = format_validation_error(err, TrainJobConfig)
        raise ConfigError(msg.replace("config error:", f"config error in {where}:")) from None
