"""MLflow Model Registry handoff: a flowrail checkpoint as a self-contained pyfunc image generator.

A registered version carries everything ``mlflow.pyfunc.load_model("models:/NAME@champion")`` needs in a fresh
process, for every model family:

- ``checkpoint``: ``flowrail.json`` (config without tracking URI or credentials, data info, step) and
  ``ema.safetensors`` (the EMA weights used for sampling; for a FLUX LoRA fine-tune, the adapter only);
- ``autoencoder`` (latent SiT/DFM and FLUX): the diffusers ``AutoencoderKL`` folder that decodes samples to RGB;
- FLUX: ``prompts`` (the caption embeddings that labels select), ``flux_lora`` (the adapter in diffusers' LoRA format,
  for ``FluxPipeline.load_lora_weights``) and ``base.json``, a reference to the base weights (path and fingerprint)
  that the loader checks, overridable with ``$FLOWRAIL_FLUX_BASE``;
- the flowrail ``pipeline`` package as code, and requirements pinned to the versions it was logged with
  (diffusers/transformers/peft where the family needs them).

``predict`` takes a DataFrame with one row per image: ``label`` (class, or caption index for FLUX), and optionally
``seed``, ``steps``, ``method``, ``solver``, ``diffusion``, ``diffusion_norm``, ``guidance`` (missing values fall
back to the sampler settings the model was registered with). Rows that share seed and sampler settings are drawn as
one batch from one generator seeded with ``seed``. It returns ``(N, H, W, C)`` uint8 RGB (or grey) images: decoded
images for latent models, which is the shape the signature declares.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from pipeline.errors import CheckpointError, FlowrailError

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLER_COLUMNS = {"seed": "long", "steps": "long", "method": "string", "solver": "string",
                   "diffusion": "string", "diffusion_norm": "double", "guidance": "double"}
# what the model needs at load time, pinned to the versions it was logged with
REQUIREMENTS = ("torch", "numpy", "pandas", "safetensors", "pydantic", "pyyaml", "pillow", "scipy", "torchdiffeq",
                "mlflow")
LATENT_REQUIREMENTS = ("diffusers", "huggingface_hub", "accelerate")  # AutoencoderKL decodes the samples
FLUX_REQUIREMENTS = ("diffusers", "huggingface_hub", "accelerate", "transformers", "peft", "tokenizers",
                     "sentencepiece", "protobuf")
BASE_ENV = "FLOWRAIL_FLUX_BASE"  # where a loader finds the FLUX base weights when not at the recorded path


class FlowrailImageModel(mlflow.pyfunc.PythonModel):
    """Class-conditional image generation from a flowrail checkpoint (EMA weights)."""

    def __init__(self, sampler: dict[str, Any] | None = None, guidance: dict[str, Any] | None = None) -> None:
        self.default_sampler = dict(sampler or {})
        self.default_guidance = dict(guidance or {})
        self.trained = None

    def load_context(self, context: Any) -> None:
        self.trained = load_bundle(context.artifacts)

    def _settings(self, row: dict[str, Any]) -> tuple[Any, Any, int]:
        from pipeline.config import resolve_sampler

        cfg = self.trained.config
        sampler, guidance = dict(self.default_sampler), dict(self.default_guidance)
        for key in ("steps", "method", "solver", "diffusion", "diffusion_norm"):
            if _present(row.get(key)):
                sampler[key] = int(row[key]) if key == "steps" else row[key]
        if _present(row.get("guidance")):
            guidance["scale"] = float(row["guidance"])
        seed = int(row["seed"]) if _present(row.get("seed")) else 0
        s, g = resolve_sampler(cfg.sampler.model_dump(), cfg.guidance.model_dump(), sampler, guidance)
        return s, g, seed

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - untyped: MLflow reads hints
        """DataFrame rows (label, seed, steps, sampler settings) -> (N, H, W, C) uint8 images."""
        import pandas as pd
        import torch

        from pipeline.images import to_uint8
        from pipeline.sampling import sample_classes
        from pipeline.sweep.metric import with_sampler

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "label" not in frame.columns:
            raise ValueError("predict input needs a 'label' column (class index per image)")
        classes = self.trained.num_classes
        groups: dict[str, tuple[Any, Any, int, list[int]]] = {}
        for i, row in enumerate(frame.to_dict("records")):
            label = int(row["label"])
            if classes and not 0 <= label < classes:
                raise ValueError(f"label {label} is outside the model's classes 0..{classes - 1}")
            sampler, guidance, seed = self._settings(row)
            key = json.dumps([sampler.model_dump(), guidance.model_dump(), seed], sort_keys=True)
            groups.setdefault(key, (sampler, guidance, seed, []))[3].append(i)
        labels_all = frame["label"].astype("int64").to_numpy()
        out: np.ndarray | None = None
        for sampler, guidance, seed, rows in groups.values():
            model = with_sampler(self.trained, sampler, guidance)
            images = to_uint8(sample_classes(model, torch.as_tensor(labels_all[rows]), seed).x)
            if out is None:
                out = np.zeros((len(frame), *images.shape[1:]), dtype=np.uint8)
            out[rows] = images
        return out if out is not None else np.zeros((0, 0, 0, 0), dtype=np.uint8)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def family(cfg: dict[str, Any], data: dict[str, Any]) -> str:
    """``flux`` | ``latent`` (SiT/DFM on autoencoder latents) | ``pixel``."""
    if str(cfg["model"]["name"]).lower() == "flux":
        return "flux"
    return "latent" if data.get("kind") == "latents" else "pixel"


def autoencoder_dir(cfg: dict[str, Any], data: dict[str, Any]) -> Path:
    """The local AutoencoderKL folder that decodes this model's samples, or a one-line FlowrailError."""
    folder = cfg.get("flux", {}).get("autoencoder") or data.get("vae")
    if not folder or not (Path(folder) / "config.json").is_file():
        raise FlowrailError(f"cannot register: the autoencoder that decodes this model's latents is not found "
                            f"({folder or 'no vae in the shard manifest'}; expected a diffusers AutoencoderKL folder)")
    return Path(folder)


def decoded_shape(latent_shape: tuple[int, int, int], vae_dir: Path) -> tuple[int, int, int]:
    """``(C, H, W)`` of decoded images: the autoencoder upsamples by ``2 ** (len(block_out_channels) - 1)``."""
    config = json.loads((vae_dir / "config.json").read_text())
    factor = 2 ** (len(config.get("block_out_channels", [0])) - 1)
    return int(config.get("out_channels", 3)), latent_shape[1] * factor, latent_shape[2] * factor


def base_fingerprint(path: Path) -> str:
    """The FLUX base's fingerprint (:func:`pipeline.train.frozen_base.weights_fingerprint`, the one lean checkpoints
    record): SHA-256 over its transformer config and its weight files' names and sizes."""
    from pipeline.train.frozen_base import weights_fingerprint

    return weights_fingerprint(path)


def flux_base_reference(cfg: dict[str, Any]) -> dict[str, str]:
    weights = cfg["flux"].get("weights")
    if not weights or not Path(weights).exists():
        raise FlowrailError(f"cannot register: the FLUX base weights are not found (flux.weights={weights})")
    return {"path": str(Path(weights).resolve()), "sha256": base_fingerprint(Path(weights))}


def check_flux_base(reference: dict[str, str]) -> Path:
    """The base weights a FLUX model was fine-tuned from: ``$FLOWRAIL_FLUX_BASE`` or the recorded path, checked
    against the recorded fingerprint."""
    path = Path(os.environ.get(BASE_ENV) or reference["path"])
    if not path.exists():
        raise FlowrailError(f"FLUX base weights not found at {path}: set {BASE_ENV} to a local copy of "
                            f"the base this model was fine-tuned from")
    if base_fingerprint(path) != reference["sha256"]:
        raise FlowrailError(f"FLUX base weights at {path} are not the ones this model was fine-tuned from "
                            f"(fingerprint differs); set {BASE_ENV} to the right base")
    return path


def write_prompts(cfg: dict[str, Any], data: dict[str, Any], out: Path) -> Path:
    """The caption embeddings FLUX labels select (``prompts.safetensors`` + ``prompts.json``: captions, shift,
    scale), from the run's shard set as :func:`pipeline.flux.evaluation.flux_eval_view` takes them."""
    from safetensors.torch import save_file

    from pipeline.data.shards import read_manifest
    from pipeline.flux.evaluation import _autoencoder_factors, eval_prompts

    shards = cfg["data"].get("val_shards") or cfg["data"].get("shards")
    try:
        t5, pooled, captions = eval_prompts(shards)
        manifest = read_manifest(shards)
    except (OSError, ValueError, FlowrailError) as exc:
        raise FlowrailError(f"cannot register the FLUX model: its caption embeddings are not readable "
                            f"({str(exc).splitlines()[0]})") from None
    vae_shift, vae_scale = _autoencoder_factors(cfg["flux"].get("autoencoder") or data.get("vae"))
    out.mkdir(parents=True, exist_ok=True)
    save_file({"t5": t5.contiguous(), "clip_pooled": pooled.contiguous()}, str(out / "prompts.safetensors"))
    (out / "prompts.json").write_text(json.dumps({
        "captions": captions, "shift": float(manifest.get("shift_factor", vae_shift) or 0.0),
        "scale": float(data.get("latent_scale") or manifest.get("latent_scale") or vae_scale or 1.0)}))
    return out


def load_bundle(artifacts: dict[str, str]) -> Any:
    """A :class:`pipeline.train.checkpoint.Trained` from a registered model's artifacts only (plus the checked FLUX
    base): the decoding autoencoder and the FLUX prompts come from the artifacts, not from paths of the machine
    that trained it."""
    from pipeline.config import TrainJobConfig
    from pipeline.train.checkpoint import load_trained, read_meta

    ckpt = Path(artifacts["checkpoint"])
    meta = read_meta(ckpt)
    vae = artifacts.get("autoencoder")
    if str(meta["config"]["model"]["name"]).lower() != "flux":
        trained = load_trained(ckpt)
        return replace(trained, data=replace(trained.data, vae=vae)) if vae else trained
    import torch
    from safetensors.torch import load_file

    from pipeline.data.streaming import DataInfo
    from pipeline.flux.evaluation import PromptSampler
    from pipeline.flux.export import load_finetuned_from_checkpoint
    from pipeline.objective import build_objective
    from pipeline.train.checkpoint import Trained

    base = check_flux_base(json.loads(Path(artifacts["flux_base"]).read_text()))
    cfg = TrainJobConfig.model_validate(meta["config"])
    cfg.flux.weights, cfg.flux.autoencoder = str(base), vae
    cfg.init_from = None  # its weights are part of the EMA tensors of a full fine-tune; a LoRA's base is flux.weights
    model, cfg = load_finetuned_from_checkpoint(ckpt, cfg)
    prompts = Path(artifacts["prompts"])
    tensors = load_file(str(prompts / "prompts.safetensors"))
    info = json.loads((prompts / "prompts.json").read_text())
    data = DataInfo(**meta["data"])
    sampler = PromptSampler(objective=build_objective(cfg, data.num_classes), t5=tensors["t5"].float(),
                            clip_pooled=tensors["clip_pooled"].float(), captions=info["captions"],
                            shift=info["shift"], scale=info["scale"])
    data = replace(data, num_classes=len(info["captions"]), vae=vae, latent_scale=info["scale"])
    torch.set_grad_enabled(False)
    return Trained(config=cfg, model=model.requires_grad_(False), objective=sampler, data=data,
                   step=int(meta["step"]), path=ckpt, run_id=meta.get("mlflow_run_id"))


def write_checkpoint_artifact(ckpt: Path, out: Path) -> Path:
    """``flowrail.json`` (config made shareable: no tracking URI, no credentials) and ``ema.safetensors``."""
    from pipeline.tracking import shareable_config
    from pipeline.train.checkpoint import EMA_FILE, META, read_meta

    out.mkdir(parents=True)
    meta = read_meta(ckpt)
    meta["config"] = shareable_config(meta["config"])
    (out / META).write_text(json.dumps(meta, indent=2))
    shutil.copy2(ckpt / EMA_FILE, out / EMA_FILE)
    return out


def copy_autoencoder(vae: Path, dst: Path) -> None:
    """Copy the autoencoder folder into the model's artifacts, links followed (a folder from a cache of links) only
    after every target is checked against the fences (one line naming the path if one lies in a fence)."""
    from pipeline.data.fence import check_tree

    check_tree(vae, "register")
    shutil.copytree(vae, dst)


def prepare_artifacts(ckpt: Path, meta: dict[str, Any], tmp: Path) -> tuple[dict[str, str], tuple[int, int, int], str]:
    """``(artifacts, output image shape (C, H, W), family)`` of a checkpoint; refuses (one line) a model whose
    autoencoder or FLUX base cannot be found."""
    cfg, data = meta["config"], meta["data"]
    kind = family(cfg, data)
    artifacts = {"checkpoint": str(write_checkpoint_artifact(ckpt, tmp / "checkpoint"))}
    shape = (int(data["channels"]), int(data["size"]), int(data["size"]))
    if kind == "flux":
        (tmp / "flux_base.json").write_text(json.dumps(flux_base_reference(cfg)))
        artifacts["flux_base"] = str(tmp / "flux_base.json")
    if kind in ("latent", "flux"):
        vae = autoencoder_dir(cfg, data)
        copy_autoencoder(vae, tmp / "autoencoder")
        artifacts["autoencoder"] = str(tmp / "autoencoder")
        shape = decoded_shape(shape, vae)
    if kind == "flux":
        artifacts["prompts"] = str(write_prompts(cfg, data, tmp / "prompts"))
        if cfg["flux"].get("mode") == "lora":
            from pipeline.flux.export import export_finetuned

            artifacts["flux_lora"] = str(export_finetuned(ckpt, tmp / "flux_lora"))
    return artifacts, shape, kind


def signature(image_shape: tuple[int, int, int]):  # noqa: ANN201
    """Input: label (required) + optional sampler columns; output: (N, H, W, C) uint8 images."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    c, h, w = image_shape
    inputs = Schema([ColSpec("long", "label")] +
                    [ColSpec(t, name, required=False) for name, t in SAMPLER_COLUMNS.items()])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, c))]))


def input_example(num_classes: int, sampler: dict[str, Any], guidance: float) -> Any:
    import pandas as pd

    labels = list(range(min(max(num_classes, 1), 4)))
    return pd.DataFrame({"label": labels, "seed": [0] * len(labels), "steps": [int(sampler["steps"])] * len(labels),
                         "method": [sampler["method"]] * len(labels), "solver": [sampler["solver"]] * len(labels),
                         "diffusion": [sampler["diffusion"]] * len(labels),
                         "diffusion_norm": [float(sampler["diffusion_norm"])] * len(labels),
                         "guidance": [float(guidance)] * len(labels)})


def pinned_requirements(kind: str = "pixel") -> list[str]:
    """The model's requirements, pinned to the installed versions (what the family needs to load and sample)."""
    extra = {"latent": LATENT_REQUIREMENTS, "flux": FLUX_REQUIREMENTS}.get(kind, ())
    out = []
    for name in dict.fromkeys((*REQUIREMENTS, *extra)):
        try:
            v = version(name)
        except PackageNotFoundError:
            continue
        out.append(f"{name}=={v.split('+')[0]}")
    return out


def resolve_checkpoint(source: str, tracking_uri: str) -> tuple[Path, str | None]:
    """A checkpoint path, or an MLflow run id whose ``flowrail.checkpoint`` tag names one: ``(checkpoint, run_id)``."""
    from pipeline.train.checkpoint import find_latest

    path = Path(source)
    if path.exists():
        return find_latest(path), None
    from pipeline.tracking import client, redact

    try:
        run = client(tracking_uri).get_run(source)
    except Exception:  # noqa: BLE001 - MLflow raises RestException/MlflowException for an unknown id
        raise FlowrailError(f"'{source}' is neither a checkpoint path nor a run id on {redact(tracking_uri)}") from None
    ckpt = run.data.tags.get("flowrail.checkpoint")
    if not ckpt:
        raise CheckpointError(f"run {source} has no flowrail.checkpoint tag (was it a flowrail training run?)")
    return find_latest(ckpt), source


@dataclass
class Registered:
    name: str
    version: str
    model_uri: str
    run_id: str
    aliases: list[str]
    reason: str = ""
    sampler: str = ""  # the resolved sampler, one line (pipeline.config.sampler_line)


def accept_checkpoint(ckpt: Path, meta: dict[str, Any]) -> None:
    """The one place where a checkpoint is accepted (or refused, with a one-line FlowrailError) before anything is
    logged or registered; every path to the registry (``flowrail register``, the sweep) passes here.

    Checks that belong to a stage (e.g. the privacy stage's audit gate) are added here.
    """
    if "config" not in meta or "data" not in meta:
        raise CheckpointError(f"checkpoint {ckpt} has no config/data in its metadata: not a flowrail training checkpoint")


def data_reference(cfg: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The training shard set: path, kind, sample count and the SHA-256 of its manifest (which lists every shard's
    own sha256), so the version names exactly the data it was trained on."""
    from pipeline.data.shards import MANIFEST

    path = Path(cfg["data"]["shards"])
    manifest = path / MANIFEST
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else ""
    return {"path": str(path), "kind": data.get("kind"), "num_samples": data.get("num_samples"), "sha256": digest,
            "manifest": str(manifest) if manifest.is_file() else None}


def register(checkpoint: str | Path, name: str, tracking_uri: str, *, run_id: str | None = None,
             experiment: str = "flowrail", aliases: list[str] | tuple[str, ...] = (),
             sampler: dict[str, Any] | None = None, guidance: dict[str, Any] | None = None,
             tags: dict[str, Any] | None = None, score: Any = None, gate: Any = None
             ) -> Registered:
    """Log ``checkpoint`` as a self-contained pyfunc model (into ``run_id``, else a new run), register a new version
    of ``name`` with its model card, metric and training data, and point aliases at it.

    ``gate`` (a :class:`pipeline.gate.GateSpec`): the promotion gate (:mod:`pipeline.promotion`) re-scores the
    current champion with this checkpoint under its protocol and picks the alias; ``aliases`` are set as well.
    ``score``: a number recorded without a gate (a :class:`pipeline.promotion.Score`).
    """
    import mlflow

    from pipeline.config import resolve_sampler
    from pipeline.train.checkpoint import find_latest, read_meta

    ckpt = find_latest(checkpoint)
    meta = read_meta(ckpt)
    accept_checkpoint(ckpt, meta)
    cfg = meta["config"]
    s_cfg, g_cfg = resolve_sampler(cfg["sampler"], cfg["guidance"], sampler, guidance, where="register")
    sampler, guidance = s_cfg.model_dump(), g_cfg.model_dump()
    with tempfile.TemporaryDirectory(prefix="flowrail-register-") as tmp:
        artifacts, shape, kind = prepare_artifacts(ckpt, meta, Path(tmp))  # refuses before anything is logged
        decision = None
        if gate is not None:  # scored (with the champion) before anything is logged
            from pipeline.gate import run_gate
            from pipeline.tracking import client

            score, decision, _ = run_gate(ckpt, meta, name, client(tracking_uri), gate, sampler, guidance)
        mlflow.set_tracking_uri(tracking_uri)  # the fluent log_model below writes to the current tracking URI
        return _log_and_register(ckpt, meta, name, tracking_uri, experiment, run_id, sampler, guidance, artifacts,
                                 shape, kind, list(aliases), tags, score, decision)


def _log_and_register(ckpt, meta, name, tracking_uri, experiment, run_id, sampler, guidance, artifacts,  # noqa: ANN001, ANN202
                      shape, kind, aliases, tags, score, decision):
    import mlflow

    from pipeline.promotion import model_card
    from pipeline.tracking import client, ensure_experiment

    c = client(tracking_uri)
    if run_id is None:
        exp_id = ensure_experiment(tracking_uri, experiment)
        run_id = c.create_run(exp_id, run_name=f"register-{name}", tags={"flowrail.job": "register",
                                                                          "flowrail.checkpoint": str(ckpt)}).info.run_id
        status_after = "FINISHED"
    else:
        status_after = c.get_run(run_id).info.status
    data_ref = data_reference(meta["config"], meta["data"])
    with mlflow.start_run(run_id=run_id):
        _log_training_data(data_ref)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=FlowrailImageModel(sampler, guidance), artifacts=artifacts,
            code_paths=[str(PACKAGE_DIR)], signature=signature(shape),
            input_example=input_example(int(meta["data"].get("num_classes") or 0), sampler, guidance["scale"]),
            pip_requirements=pinned_requirements(kind), registered_model_name=name)
    if status_after != "RUNNING":
        c.set_terminated(run_id, status=status_after)
    ver = str(info.registered_model_version)
    if decision is not None:
        aliases = [decision.alias, *[a for a in aliases if a != decision.alias]]
    version_tags = {"flowrail.checkpoint": str(ckpt), "flowrail.step": meta["step"], "flowrail.family": kind,
                    "flowrail.data": data_ref["path"], "flowrail.data_sha256": data_ref["sha256"],
                    "flowrail.training_run": run_id,
                    **{f"sampler.{k}": v for k, v in sampler.items()},
                    **{f"guidance.{k}": v for k, v in guidance.items()}, **(score.tags() if score else {}),
                    "flowrail.sampler_settings": json.dumps({"sampler": sampler, "guidance": guidance})}
    if decision is not None:
        version_tags.update({"flowrail.promotion": decision.alias, "flowrail.promotion_reason": decision.reason,
                             "flowrail.champion_metric_value": "none" if decision.champion_value is None
                             else repr(decision.champion_value)})
    version_tags.update(tags or {})  # the caller's last (e.g. flowrail.promotion=forced)
    for k, v in version_tags.items():
        c.set_model_version_tag(name, ver, k, str(v))
    c.update_model_version(name, ver, description=model_card(
        name=name, family=kind, meta=meta, data_ref=data_ref, sampler=sampler, guidance=guidance, score=score,
        run_id=run_id, decision=decision))
    for alias in aliases:
        c.set_registered_model_alias(name, alias, ver)
    from pipeline.config import GuidanceConfig, SamplerConfig, sampler_line

    line = sampler_line(SamplerConfig.model_validate(sampler), GuidanceConfig.model_validate(guidance))
    return Registered(name=name, version=ver, model_uri=f"models:/{name}/{ver}", run_id=run_id,
                      aliases=list(aliases), reason=decision.reason if decision else "", sampler=line)


def _log_training_data(data_ref: dict[str, Any]) -> None:
    """The training shard set as an MLflow dataset input of the run (source path, digest = manifest hash), and its
    manifest as an artifact."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    dataset = MetaDataset(resolve_dataset_source(data_ref["path"]), name=Path(data_ref["path"]).name or "shards",
                          digest=data_ref["sha256"][:32] or None)
    mlflow.log_input(dataset, context="training")
    if data_ref["manifest"]:
        mlflow.log_artifact(data_ref["manifest"], artifact_path="training_data")
