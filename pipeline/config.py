"""Typed, validated configuration: YAML files in ``jobs/configs/`` plus dotted ``key=value`` overrides.

Every section forbids unknown keys, so a typo is reported as one line that names the key and what is allowed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    # per worker; auto (train.use_gpu=true only): the largest batch whose training step fits in the accelerator's
    # memory, found by each worker before training (doubling, then bisection; pipeline/train/batch_probe.py)
    batch_size: int | Literal["auto"] = 64
    # shuffle span: samples are shuffled within windows of whole shards holding at least this many samples
    # (pipeline/data/epoch_stream.py; a resume restarts at its window); 0 keeps the shards' order
    shuffle_buffer: int = Field(default=512, ge=0)
    bad_sample_policy: Literal["fail", "skip"] = "skip"  # corrupt/malformed samples: raise, or skip and count
    # every shard's sha256 against the manifest before training: once per manifest (cached in verified.json next to
    # it), in parallel Ray tasks (pipeline/data/verify.py)
    verify_checksums: bool = True
    # CPUs each training worker's Ray Data stream may use (its executor's resource limit; pipeline/data/read_budget.py).
    # None: the cluster's CPUs not reserved by training workers, shared equally between them
    read_cpus: float | None = Field(default=None, gt=0)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_or_auto(cls, value: Any) -> int | str:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"data.batch_size={value}: must be a whole number >= 1, or auto")


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
    # auto: the family's default (uniform for SiT and FLUX; DFM: logit-normal(logit_mean, logit_std) for the chosen
    # stage, as in the paper)
    time_sampler: Literal["auto", "uniform", "logit_normal", "mode"] = "auto"
    logit_mean: float = 0.0
    logit_std: float = Field(default=1.0, gt=0)
    mode_scale: float = 1.29
    resolution_shift: bool = False  # FLUX resolution-dependent shift of training times
    polynomial_n: float = Field(default=2.0, gt=0)
    vp_beta_min: float = Field(default=0.1, gt=0)
    vp_beta_max: float = Field(default=20.0, gt=0)


class SamplerConfig(Section):
    """Evaluation-time sampling choices, applicable to any checkpoint (REFERENCE.md 3)."""

    method: Literal["ode", "sde", "flow_map"] = "ode"  # flow_map: few-step jumps of a flow-map model (objective.name=flow_map)
    solver: Literal["euler", "heun", "midpoint", "rk4", "pseudo_corrector", "dopri5"] = "euler"
    steps: int = Field(default=32, ge=1)
    atol: float = Field(default=1e-6, gt=0)
    rtol: float = Field(default=1e-3, gt=0)
    # sampling-grid shift t / (t + shift (1 - t)): a number = that shift (1 = none, a uniform grid); "auto" = the
    # FLUX resolution shift exp(mu(image tokens)); None = the family's default (1 for SiT/DFM, auto for FLUX)
    time_shift: float | Literal["auto"] | None = None
    diffusion: Literal["constant", "sbdm", "sigma", "linear", "decreasing", "increasing_decreasing"] = "sigma"
    diffusion_norm: float = Field(default=1.0, ge=0)
    last_step: Literal["none", "mean", "tweedie", "euler"] = "mean"
    last_step_size: float = Field(default=0.04, gt=0, lt=1)
    # a named bundle of the settings above (and guidance.channels) that reproduces a paper's sampler; keys given
    # explicitly win over the preset's (see SAMPLER_PRESETS)
    preset: Literal["sit_sde", "sit_ode"] | None = None

    @model_validator(mode="after")
    def _sde_solvers(self) -> SamplerConfig:
        if isinstance(self.time_shift, float) and not self.time_shift > 0:
            raise ValueError(f"sampler.time_shift={self.time_shift} must be > 0, 'auto' or null")
        if self.method == "sde" and self.solver not in ("euler", "heun"):
            raise ValueError(f"sampler.solver={self.solver} is not an SDE solver (allowed with sampler.method=sde: euler, heun)")
        return self


class GuidanceConfig(Section):
    """Classifier-free guidance v = v_u + w (v_c - v_u), optionally only for t in [t_min, t_max]."""

    scale: float = Field(default=1.0, ge=0)
    t_min: float = Field(default=0.0, ge=0, le=1)
    t_max: float = Field(default=1.0, ge=0, le=1)
    channels: int | None = Field(default=None, ge=1)  # guide only the first C output channels (SiT/DiT legacy: 3)


# SiT's published samplers (REFERENCE.md sections 3, 5; SiT's sample.py / sample_ddp.py): "num-sampling-steps 250"
# is 249 Euler-Maruyama steps on linspace(0, 0.96, 250) plus the mean last step of size 0.04 (250 NFE); the ODE is
# dopri5 (atol 1e-6, rtol 1e-3) on [0, 1]; classifier-free guidance acts on the first 3 latent channels.
SAMPLER_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sit_sde": {"sampler": {"method": "sde", "solver": "euler", "steps": 249, "diffusion": "sigma",
                            "diffusion_norm": 1.0, "last_step": "mean", "last_step_size": 0.04},
                "guidance": {"channels": 3}},
    "sit_ode": {"sampler": {"method": "ode", "solver": "dopri5", "atol": 1e-6, "rtol": 1e-3},
                "guidance": {"channels": 3}},
}


def check_preset(name: Any) -> None:
    """A named sampler preset must exist (None: no preset); one-line :class:`ConfigError` otherwise."""
    if name is not None and name not in SAMPLER_PRESETS:
        raise ConfigError(f"config error: sampler.preset={name} is unknown (presets: {', '.join(SAMPLER_PRESETS)})")


def layer_sampler(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a config mapping: a YAML file's, a checkpoint's stored config, a trial's) with ``given`` (the keys
    given now: the command line, a sweep override, a sampling variant) merged over it, the one sampler resolution
    every path uses. A preset named in ``given`` sits between them: base < preset named now < keys given now, so a
    checkpoint's stored sampler never overrides a preset given now and an explicit key wins over the preset.
    (A preset named only in ``base`` is filled by :func:`expand_sampler_preset` at validation: ``base``'s keys win.)
    """
    sampler = given.get("sampler") if isinstance(given.get("sampler"), dict) else {}
    name = sampler.get("preset")
    if name is None:
        return deep_merge(base, given)
    check_preset(name)
    return deep_merge(deep_merge(base, SAMPLER_PRESETS[name]), given)


def resolve_sampler(base_sampler: dict[str, Any], base_guidance: dict[str, Any],
                    sampler: dict[str, Any] | None = None, guidance: dict[str, Any] | None = None,
                    where: str = "config error") -> tuple[SamplerConfig, GuidanceConfig]:
    """Validated sampler and guidance settings: ``base_*`` (stored) with the keys given now layered by
    :func:`layer_sampler`; a bad value is a one-line :class:`ConfigError` starting with ``where``."""
    tree = layer_sampler({"sampler": dict(base_sampler), "guidance": dict(base_guidance)},
                         {"sampler": dict(sampler or {}), "guidance": dict(guidance or {})})
    tree = expand_sampler_preset(tree)
    out = []
    for schema, section in ((SamplerConfig, "sampler"), (GuidanceConfig, "guidance")):
        try:
            out.append(schema.model_validate(tree[section]))
        except ValidationError as err:
            msg = format_validation_error(err, schema).replace("config error: ", "")
            if not msg.startswith(f"{section}."):
                msg = f"{section}.{msg}"
            raise ConfigError(f"{where}: {msg}") from None
    return out[0], out[1]


SAMPLER_LINE_FIELDS = {"ode": ("solver", "steps", "time_shift"),
                       "sde": ("solver", "steps", "time_shift", "diffusion", "diffusion_norm", "last_step",
                               "last_step_size"),
                       "flow_map": ("steps", "time_shift")}


def sampler_line(sampler: SamplerConfig, guidance: GuidanceConfig) -> str:
    """The resolved sampler in one line (the fields its method uses), for consoles and MLflow tags."""
    fields = list(SAMPLER_LINE_FIELDS[sampler.method])
    if sampler.method == "ode" and sampler.solver == "dopri5":
        fields = [f for f in fields if f != "steps"] + ["atol", "rtol"]
    parts = [f"preset={sampler.preset}"] if sampler.preset else []
    parts += [f"method={sampler.method}"] + [f"{f}={getattr(sampler, f)}" for f in fields]
    parts += [f"guidance.scale={guidance.scale}"]
    if guidance.scale != 1.0:
        parts += [f"guidance.t=[{guidance.t_min}, {guidance.t_max}]"]
    if guidance.channels is not None:
        parts += [f"guidance.channels={guidance.channels}"]
    return " ".join(parts)


def expand_sampler_preset(data: Any) -> Any:
    """Fill the settings of ``sampler.preset`` that ``data`` (a raw config mapping) does not give explicitly."""
    if not isinstance(data, dict) or not isinstance(data.get("sampler"), dict):
        return data
    name = data["sampler"].get("preset")
    if name not in SAMPLER_PRESETS:
        return data  # None, or an unknown name that validation then reports
    out = dict(data)
    for section, values in SAMPLER_PRESETS[name].items():
        given = dict(out.get(section) or {}) if isinstance(out.get(section) or {}, dict) else out.get(section)
        if isinstance(given, dict):
            out[section] = {**values, **given}
    return out


DEEPSPEED_PRESETS = {"zero2": (2, False), "zero3": (3, False), "zero3_offload": (3, True)}  # name: (stage, offload)


class TrainConfig(Section):
    num_workers: int = Field(default=2, ge=1)
    cpus_per_worker: float = Field(default=0.5, gt=0)
    use_gpu: bool = False
    zero_stage: int = Field(default=2, ge=0, le=3)
    offload: bool = False  # ZeRO-3 CPU offload of parameters and optimizer state
    # one worker (train.num_workers=1) runs ZeRO-1/2 as DeepSpeed stage 0: one rank partitions nothing, so memory is
    # the same, but ZeRO-2 copies every gradient into flat buffers (near-free model on CPU: 3.6 vs 1.3 ms per engine
    # step). Not with train.offload or a DeepSpeed preset, which keep their stage. false: train.zero_stage as given.
    stage0_single_worker: bool = True
    # deepspeed: DeepSpeed's engine (ZeRO, presets, offload). torch: a plain PyTorch engine for one worker without
    # partitioning (pipeline/train/torch_engine.py), ~2.7 ms less host work per step than DeepSpeed's; its checkpoints
    # resume only under train.engine=torch
    engine: Literal["deepspeed", "torch"] = "deepspeed"
    # DeepSpeed settings merged under flowrail's keys: a shipped preset (zero2, zero3, zero3_offload; it sets
    # zero_stage/offload unless those are given) or a path to a DeepSpeed .json (relative: to where flowrail runs)
    deepspeed_preset: str | None = None
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
    # where the EMA's averaged tensors live: auto = beside the live weights; cpu = host memory (GPU memory saved,
    # one device-to-host copy of the trained weights per step). Under ZeRO-3 each rank keeps 1/world of it.
    ema_device: Literal["auto", "cpu"] = "auto"
    # micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps): one optimizer step, one EMA update
    # and one counted step per window; global batch = data.batch_size x grad_accum_steps x num_workers
    grad_accum_steps: int = Field(default=1, ge=1)
    log_every: int = Field(default=20, ge=1)
    checkpoint_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    eval_every: int = Field(default=0, ge=0)  # evaluate the EMA every K steps and at the end; 0: never
    max_bad_steps: int = Field(default=10, ge=0)  # NaN/Inf losses skipped before the run aborts
    max_failures: int = Field(default=3, ge=-1)  # Ray Train FailureConfig: worker-group restarts; -1 retries forever
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # Ray placement of the workers
    storage_path: str | None = None  # Ray checkpoint storage: a shared dir or a pyarrow URL (s3://, gs://); None: run_dir/ray

    @model_validator(mode="after")
    def _preset(self) -> TrainConfig:
        """A named preset must exist; it implies its ZeRO stage (and offload) unless those were set explicitly."""
        name = self.deepspeed_preset
        if name is None or name.endswith(".json"):
            return self
        if name not in DEEPSPEED_PRESETS:
            raise ValueError(f"train.deepspeed_preset={name} is unknown (allowed: {', '.join(DEEPSPEED_PRESETS)}, "
                             "or a path to a DeepSpeed .json file)")
        stage, offload = DEEPSPEED_PRESETS[name]
        if "zero_stage" not in self.model_fields_set:
            self.zero_stage = stage
        if "offload" not in self.model_fields_set:
            self.offload = offload
        return self


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
    bpd_samples: int = Field(default=64, ge=1)  # data samples for the bpd / reconstruction_mse metrics
    cache_dir: str | None = None  # digits classifier and reference stats; None: $FLOWRAIL_CACHE or ~/.cache/flowrail


class TrackingConfig(Section):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under run_dir
    experiment: str = "flowrail"
    on_unreachable: Literal["fail", "buffer"] = "buffer"  # buffer: train on, log when the server returns
    buffer_grace_s: float = Field(default=60.0, ge=0)  # buffer: at the end, wait this long for the server to return


class LogConfig(Section):
    """What the console shows; ``--verbose`` on the command line sets ``verbose`` too."""

    verbose: bool = False  # also Ray Data's per-dataset execution logs and Ray Train's per-rank report lines
    system_metrics: bool = True  # MLflow system/ metrics (CPU, memory; GPU with nvidia-ml-py) for training runs
    system_metrics_interval_s: float = Field(default=10.0, gt=0)  # one sample per node every this many seconds


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


class ObjectiveConfig(Section):
    """``family``: the model family's own objective (SiT transport, DFM, FLUX); ``flow_map``: a SiT trained as a
    flow map (MeanFlow identity, Decoupled MeanFlow conditioning; settings in ``flow_map.*``)."""

    name: Literal["family", "flow_map"] = "family"


class FlowMapConfig(Section):
    """Flow-map training and sampling (REFERENCE.md section 11); used when ``objective.name=flow_map``."""

    # the training mix: dmf = Decoupled MeanFlow's (a flow-matching and a MeanFlow loss on every batch, 0.5/0.5, each
    # with its own logit-normal times, error ||delta||^2); split = a fraction `ratio` of the batch's pairs jump, the
    # rest are flow matching, times from `time_sampler`, error = mean over dimensions
    recipe: Literal["dmf", "split"] = "dmf"
    # k: the last k blocks (and the final layer) see the target time; None: round(depth * 8 / 28), at least 1
    decoupled_blocks: int | None = None
    jvp: Literal["func", "finite_difference"] = "func"  # d/ds u by torch.func.jvp, or a central finite difference
    fd_eps: float = Field(default=1e-3, gt=0, lt=0.1)  # finite-difference step along (v, 1, 0), taken in fp32
    target: Literal["data", "teacher"] = "data"  # v_s: x1 - x0 of the pair, or the teacher's velocity (distillation)
    teacher: str | None = None  # teacher checkpoint for target=teacher; None: init_from
    teacher_guidance: float = Field(default=1.0, ge=0)  # CFG scale folded into the teacher's velocity
    ratio: float = Field(default=0.25, ge=0, le=1)  # recipe=split: fraction of pairs with s != t (the rest: s = t)
    time_sampler: Literal["uniform", "logit_normal"] = "uniform"  # recipe=split: law of the two times per pair
    logit_mean: float = -0.4  # recipe=split, time_sampler=logit_normal
    logit_std: float = Field(default=1.0, gt=0)  # every logit-normal time law's std
    fm_logit_mean: float = 0.0  # recipe=dmf: the flow-matching loss's time law sigmoid(N(m, std))
    mf_logit_means: tuple[float, float] = (-0.4, 1.2)  # recipe=dmf: the MeanFlow pair's two draws; s = min, r = max
    weight_power: float = Field(default=1.0, ge=0)  # adaptive weight w = 1 / (err + c)^p, stop-gradient
    weight_eps: float = Field(default=1e-3, gt=0)  # c
    # model guidance in training (either recipe): v <- v + omega sg(u(x,t,t|y) - u(x,t,t|null)) for labelled samples
    # with t in [guidance_t_min, guidance_t_max]; 0 = off. A map trained with it refuses sampling-time CFG.
    guidance: float = Field(default=0.0, ge=0)
    guidance_t_min: float = Field(default=0.3, ge=0, le=1)
    guidance_t_max: float = Field(default=1.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _landed_recipe(cls, data: Any) -> Any:
        from pipeline.flow_map.settings import landed_recipe  # a checkpoint written before recipes: recipe=split

        return landed_recipe(data)


def flow_map_refusal(cfg: TrainJobConfig) -> str | None:
    """Why ``cfg`` cannot run as (or sample as) a flow map, in one line; None if it can."""
    fm, name = cfg.flow_map, cfg.model.name.strip()
    if cfg.objective.name != "flow_map":
        if cfg.sampler.method == "flow_map":
            return ("sampler.method=flow_map needs a flow-map model (objective.name=flow_map); this one was trained "
                    f"with objective.name={cfg.objective.name}")
        changed = [k for k, v in fm.model_dump().items() if v != FlowMapConfig.model_fields[k].default]
        if changed:
            return f"flow_map.{changed[0]} is set but objective.name={cfg.objective.name} (flow_map.* needs objective.name=flow_map)"
        return None
    from pipeline.models.sit import parse_named_config  # lazy: only torch/numpy below it

    named = parse_named_config(name) if name.lower() != "sit" else None
    if name.lower() != "sit" and named is None:
        return f"objective.name=flow_map needs a SiT model (model.name=sit or SiT-*), not model.name={name}"
    depth = named[0].depth if named else cfg.model.depth
    from pipeline.flow_map.settings import recipe_refusal  # lazy: pipeline.flow_map imports this module

    refusal = recipe_refusal(cfg, depth)
    if refusal:
        return refusal
    if cfg.transport.path != "linear" or cfg.transport.prediction != "velocity":
        return ("objective.name=flow_map needs transport.path=linear and transport.prediction=velocity "
                f"(got {cfg.transport.path}/{cfg.transport.prediction})")
    if fm.jvp == "func" and cfg.train.zero_stage == 3:
        return ("flow_map.jvp=func cannot run on ZeRO-3 partitioned weights (train.zero_stage=3): "
                "use flow_map.jvp=finite_difference")
    if fm.jvp == "func" and cfg.model.grad_checkpointing:
        return "flow_map.jvp=func cannot run through activation checkpointing (model.grad_checkpointing=true): " \
               "use flow_map.jvp=finite_difference"
    if fm.target == "teacher" and not (fm.teacher or cfg.init_from):
        return "flow_map.target=teacher needs a teacher: set flow_map.teacher or init_from"
    if fm.target == "data" and fm.teacher_guidance != 1.0:
        return "flow_map.teacher_guidance needs flow_map.target=teacher (the data target has no teacher)"
    return None


class TrainJobConfig(Section):
    """Everything ``flowrail train`` (and ``flowrail run``) needs."""

    run_name: str = "digits"
    seed: int = 0
    run_dir: str = "runs"  # made absolute at load time
    init_from: str | None = None  # an official SiT/DiT checkpoint or a flowrail checkpoint to fine-tune from
    # accept an init_from checkpoint whose path / prediction / learn_sigma / class count differ from this config
    # (the differences are then adapted and reported); false: such a mismatch is refused in one line
    init_from_override: bool = False
    # what an init_from file that does not say it (a bare state dict, a .safetensors export, args without
    # path_type/prediction) was trained as: required for such a file, refused when init_from is not set
    init_from_path: Literal["linear", "gvp", "vp"] | None = None
    init_from_prediction: Literal["velocity", "score", "noise"] | None = None
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
    log: LogConfig = LogConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    flow_map: FlowMapConfig = FlowMapConfig()

    @model_validator(mode="after")
    def _flow_map_settings(self) -> TrainJobConfig:
        refusal = flow_map_refusal(self)
        if refusal:
            raise ValueError(refusal)
        return self

    @model_validator(mode="after")
    def _init_from_declarations(self) -> TrainJobConfig:
        for key in ("init_from_path", "init_from_prediction"):
            if getattr(self, key) is not None and not self.init_from:
                raise ValueError(f"{key}={getattr(self, key)} declares what init_from was trained as, but init_from "
                                 "is not set")
        return self

    @model_validator(mode="after")
    def _auto_batch_needs_an_accelerator(self) -> TrainJobConfig:
        if self.data.batch_size == "auto" and not self.train.use_gpu:
            raise ValueError("data.batch_size=auto probes the accelerator's memory and needs train.use_gpu=true; "
                             "on the CPU give a number (e.g. data.batch_size=64)")
        if self.data.batch_size == "auto" and self.model.name.strip().lower() == "flux":
            raise ValueError("data.batch_size=auto probes image models (sit, SiT-*, dfm); model.name=flux needs a "
                             "number")
        return self

    @model_validator(mode="before")
    @classmethod
    def _sampler_preset(cls, data: Any) -> Any:
        return expand_sampler_preset(data)

    def resolve_paths(self, base: Path | None = None) -> TrainJobConfig:
        """Make run_dir and relative data paths absolute (Ray changes each worker's working directory)."""
        base = base or Path.cwd()
        root = Path(self.run_dir)
        self.run_dir = str(root if root.is_absolute() else (base / root).resolve())
        for holder, field in ((self.flow_map, "teacher"), (self, "init_from")):  # read again inside Ray workers
            value = getattr(holder, field)
            if value and "://" not in value and not Path(value).is_absolute():
                setattr(holder, field, str((base / value).resolve()))
        for field in ("shards", "val_shards"):
            value = getattr(self.data, field)
            if value and "://" not in value and not Path(value).is_absolute():
                setattr(self.data, field, str((base / value).resolve()))
        preset = self.train.deepspeed_preset
        if preset and preset.endswith(".json") and not Path(preset).expanduser().is_absolute():
            self.train.deepspeed_preset = str((base / preset).resolve())
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
    data = layer_sampler(data, parse_overrides(overrides or []))  # a preset on the command line beats the file's keys
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
