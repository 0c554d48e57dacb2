"""Typed, validated configuration: YAML files in ``jobs/configs/`` plus dotted ``key=value`` overrides.

Every section forbids unknown keys, so a typo is reported as one line that names the key and what is allowed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import first_line

CONFIG_DIR = Path(__file__).resolve().parent.parent / "jobs" / "configs"


class ConfigError(ValueError):
    """A user error in configuration; its message is one line naming the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Where the shards are and how they become tensors."""

    # a shard directory or its manifest file, local or on an object store (s3://bucket/prefix, gs://...)
    shards: str = "runs/data/digits/train"
    val_shards: str | None = "runs/data/digits/val"
    image_size: int | None = Field(default=16, ge=2)  # resize (bilinear) on the fly; None keeps the stored size
    batch_size: int = Field(default=64, ge=1)  # per worker
    shuffle_buffer: int = Field(default=512, ge=0)  # local shuffle of the stream; 0 disables
    bad_sample_policy: Literal["fail", "skip"] = "skip"  # corrupt/malformed samples: raise, or skip and count
    # every shard's sha256 against the manifest before training: once per manifest (cached in verified.json next to
    # it), in parallel Ray tasks (pipeline/data/verify.py)
    verify_checksums: bool = True


class ModelConfig(Section):
    """``name``: ``sit`` (custom size below), ``SiT-{S,B,L,XL}/{2,4,8}``, ``dfm`` or ``flux``."""

    name: str = "sit"
    hidden_size: int = Field(default=96, ge=8)
    depth: int = Field(default=4, ge=1)
    num_heads: int = Field(default=4, ge=1)
    patch_size: int = Field(default=2, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    class_dropout_prob: float = Field(default=0.1, ge=0, le=1)
    learn_sigma: bool = False
    grad_checkpointing: bool = False
    # DFM (Decomposable Flow Matching) options, used when name == "dfm"
    dfm_stages: int = Field(default=2, ge=1)
    dfm_stage_probs: list[float] | None = None  # p_q; default [0.9, 0.1] for 2 stages
    dfm_threshold: float = Field(default=0.9, gt=0, le=1)  # tau: stage s+1 starts when stage s reaches it
    dfm_stage_steps: list[int] | None = None  # per-stage sampling steps (e.g. [30, 10])

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.name == "sit" and self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}")
        return self


class TransportConfig(Section):
    """Interpolant path, prediction target, loss weight and training-time sampling (REFERENCE.md 2, 4)."""

    path: Literal["linear", "gvp", "vp", "polynomial", "linear_vp"] = "linear"
    prediction: Literal["velocity", "score", "noise"] = "velocity"
    loss_weight: Literal["none", "velocity", "likelihood"] = "none"
    train_eps: float | None = Field(default=None, ge=0, lt=0.5)  # None: the SiT default for path x prediction
    sample_eps: float | None = Field(default=None, ge=0, lt=0.5)
    time_sampler: Literal["uniform", "logit_normal", "mode"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = Field(default=1.0, gt=0)
    mode_scale: float = 1.29
    resolution_shift: bool = False  # FLUX resolution-dependent shift of training times
    polynomial_n: float = Field(default=2.0, gt=0)
    vp_beta_min: float = Field(default=0.1, gt=0)
    vp_beta_max: float = Field(default=20.0, gt=0)


class SamplerConfig(Section):
    """Evaluation-time sampling choices, applicable to any checkpoint (REFERENCE.md 3)."""

    method: Literal["ode", "sde"] = "ode"
    solver: Literal["euler", "heun", "midpoint", "rk4", "pseudo_corrector", "dopri5"] = "euler"
    steps: int = Field(default=32, ge=1)
    atol: float = Field(default=1e-6, gt=0)
    rtol: float = Field(default=1e-3, gt=0)
    time_shift: float = Field(default=1.0, gt=0)  # 1 = uniform grid; FLUX-style shift otherwise
    diffusion: Literal["constant", "sbdm", "sigma", "linear", "decreasing", "increasing_decreasing"] = "sigma"
    diffusion_norm: float = Field(default=1.0, ge=0)
    last_step: Literal["none", "mean", "tweedie", "euler"] = "mean"
    last_step_size: float = Field(default=0.04, gt=0, lt=1)

    @model_validator(mode="after")
    def _sde_solvers(self) -> SamplerConfig:
        if self.method == "sde" and self.solver not in ("euler", "heun"):
            raise ValueError(f"sampler.solver={self.solver} is not an SDE solver (allowed with sampler.method=sde: euler, heun)")
        return self


class GuidanceConfig(Section):
    """Classifier-free guidance v = v_u + w (v_c - v_u), optionally only for t in [t_min, t_max]."""

    scale: float = Field(default=1.0, ge=0)
    t_min: float = Field(default=0.0, ge=0, le=1)
    t_max: float = Field(default=1.0, ge=0, le=1)


class TrainConfig(Section):
    num_workers: int = Field(default=2, ge=1)
    cpus_per_worker: float = Field(default=0.5, gt=0)
    use_gpu: bool = False
    zero_stage: int = Field(default=2, ge=0, le=3)
    offload: bool = False  # ZeRO-3 CPU offload of parameters and optimizer state
    deepspeed_preset: str | None = None  # a DeepSpeed JSON (e.g. infra/deepspeed/zero3.json) merged under flowrail's keys
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # torch.compile the model inside the DeepSpeed engine (engine.compile); a one-off compile at the first step,
    # then faster steps on GPU (SiT-XL/2 bare loop on an H100: 1.58x eager). Sampling/evaluation stay eager.
    compile: bool = False
    compile_backend: str = "inductor"  # any torch.compile backend ("inductor", "aot_eager", ...)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(default=1.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    steps: int = Field(default=600, ge=1)
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    log_every: int = Field(default=20, ge=1)
    checkpoint_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    eval_every: int = Field(default=0, ge=0)  # evaluate the EMA every K steps and at the end; 0: never
    max_bad_steps: int = Field(default=10, ge=0)  # NaN/Inf losses skipped before the run aborts
    max_failures: int = Field(default=0, ge=-1)  # Ray Train FailureConfig; -1 retries forever
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # Ray placement of the workers
    storage_path: str | None = None  # Ray checkpoint storage: a shared dir or a pyarrow URL (s3://, gs://); None: run_dir/ray


class SamplesConfig(Section):
    """The labelled sample grid made after training."""

    per_class: int = Field(default=8, ge=1)
    seed: int = 0


class EvalConfig(Section):
    num_samples: int = Field(default=500, ge=2)
    metrics: list[str] = ["fd_digits", "precision", "recall", "classifier_accuracy"]
    batch_size: int = Field(default=250, ge=1)
    num_workers: int = Field(default=1, ge=1)
    inception_weights: str | None = None  # path to weights-inception-2015-12-05-6726825d.pth for FID
    reference_stats: str | None = None  # npz with mu, sigma
    seed: int = 0  # sampling seed of the evaluation (each worker derives its own from it)
    cache_dir: str | None = None  # digits classifier and reference stats; None: $FLOWRAIL_CACHE or ~/.cache/flowrail


class TrackingConfig(Section):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under run_dir
    experiment: str = "flowrail"
    on_unreachable: Literal["fail", "buffer"] = "fail"  # buffer: train on, log when the server returns
    buffer_grace_s: float = Field(default=60.0, ge=0)  # buffer: at the end, wait this long for the server to return


class FluxConfig(Section):
    weights: str | None = None  # a local diffusers folder (or its transformer/ folder) or a BFL .safetensors file
    mode: Literal["lora", "full"] = "lora"
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    lora_targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    guidance: float = Field(default=1.0, ge=0)  # guidance-embedding value for guidance-distilled models
    autoencoder: str | None = None  # local AutoencoderKL folder, for decoding samples
    config: str | None = None  # transformer config (local folder or config.json) for a single-file checkpoint
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"  # SD3-style weights on the flow-matching loss
    grad_checkpointing: bool = True
    # two-stage Decomposable Flow Matching fine-tune (pipeline/flux/dfm.py); stage probabilities, threshold and
    # per-stage sampling steps come from model.dfm_stage_probs / model.dfm_threshold / model.dfm_stage_steps
    dfm: bool = False


class TrainJobConfig(Section):
    """Everything ``flowrail train`` (and ``flowrail run``) needs."""

    run_name: str = "digits"
    seed: int = 0
    run_dir: str = "runs"  # made absolute at load time
    init_from: str | None = None  # an official SiT/DiT checkpoint or a flowrail checkpoint to fine-tune from
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    transport: TransportConfig = TransportConfig()
    sampler: SamplerConfig = SamplerConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    train: TrainConfig = TrainConfig()
    samples: SamplesConfig = SamplesConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    flux: FluxConfig = FluxConfig()

    def resolve_paths(self, base: Path | None = None) -> TrainJobConfig:
        """Make run_dir and relative data paths absolute (Ray changes each worker's working directory)."""
        base = base or Path.cwd()
        root = Path(self.run_dir)
        self.run_dir = str(root if root.is_absolute() else (base / root).resolve())
        for field in ("shards", "val_shards"):
            value = getattr(self.data, field)
            if value and "://" not in value and not Path(value).is_absolute():
                setattr(self.data, field, str((base / value).resolve()))
        return self


# ---------------------------------------------------------------- loading

SHORTHANDS = {"model": "model.name"}  # `model=SiT-S/2` means `model.name=SiT-S/2`


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = SHORTHANDS.get(key.strip(), key.strip())
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict,)):
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _allowed(schema: type[BaseModel], loc: tuple) -> str:
    model: Any = schema
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    return ", ".join(model.model_fields)


def format_validation_error(err: ValidationError, schema: type[BaseModel]) -> str:
    """One line naming the first bad key and what is allowed there."""
    first = err.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    key = ".".join(loc) or "<config>"
    if first["type"] == "extra_forbidden":
        return f"config error: unknown key '{key}' (allowed here: {_allowed(schema, loc)})"
    msg = first["msg"].replace("\n", " ")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        return f"config error: {msg}"
    return f"config error: {key}={first.get('input')!r}: {msg}"


def load_config(schema: type[BaseModel], name_or_path: str | None, overrides: list[str] | None = None,
                base: Path | None = None) -> Any:
    """Load ``jobs/configs/<name>.yaml`` (or a path), apply overrides, validate against ``schema``."""
    data: dict[str, Any] = {}
    if name_or_path:
        path = Path(name_or_path)
        if not path.suffix:
            path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {first_line(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data = deep_merge(data, parse_overrides(overrides or []))
    try:
        cfg = schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, schema)) from None
    if hasattr(cfg, "resolve_paths"):
        cfg.resolve_paths(base)
    return cfg


def tracking_uri(cfg: TrainJobConfig) -> str:
    """The MLflow tracking URI: config, else $MLFLOW_TRACKING_URI, else an absolute sqlite file under run_dir."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.run_dir).resolve() / 'mlflow.db'}"


def flatten(cfg: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value, for logging a resolved config as MLflow params."""
    items = cfg.model_dump() if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for k, v in items.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
