"""MLflow Model Registry handoff: a flowrail checkpoint as a pyfunc image generator, registered under aliases.

The pyfunc model's artifacts are the checkpoint's ``flowrail.json`` (config, data info, step) and
``ema.safetensors`` (the EMA weights used for sampling); the flowrail ``pipeline`` package travels as code, so
``mlflow.pyfunc.load_model("models:/NAME@champion")`` works in a fresh process with only the pinned requirements.

``predict`` takes a DataFrame with one row per image: ``label`` (class), and optionally ``seed``, ``steps``,
``method``, ``solver``, ``diffusion``, ``diffusion_norm``, ``guidance`` (missing values fall back to the sampler
settings the model was registered with). Rows that share seed and sampler settings are drawn as one batch from one
generator seeded with ``seed``. It returns an ``(N, H, W, C)`` uint8 array in the rows' order.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
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


class FlowrailImageModel(mlflow.pyfunc.PythonModel):
    """Class-conditional image generation from a flowrail checkpoint (EMA weights)."""

    def __init__(self, sampler: dict[str, Any] | None = None, guidance: dict[str, Any] | None = None) -> None:
        self.default_sampler = dict(sampler or {})
        self.default_guidance = dict(guidance or {})
        self.trained = None

    def load_context(self, context: Any) -> None:
        from pipeline.train.checkpoint import load_trained

        self.trained = load_trained(context.artifacts["checkpoint"])

    def _settings(self, row: dict[str, Any]) -> tuple[Any, Any, int]:
        from pipeline.config import GuidanceConfig, SamplerConfig

        cfg = self.trained.config
        sampler = {**cfg.sampler.model_dump(), **self.default_sampler}
        guidance = {**cfg.guidance.model_dump(), **self.default_guidance}
        for key in ("steps", "method", "solver", "diffusion", "diffusion_norm"):
            if _present(row.get(key)):
                sampler[key] = int(row[key]) if key == "steps" else row[key]
        if _present(row.get("guidance")):
            guidance["scale"] = float(row["guidance"])
        seed = int(row["seed"]) if _present(row.get("seed")) else 0
        return SamplerConfig.model_validate(sampler), GuidanceConfig.model_validate(guidance), seed

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


def _validated(schema: Any, values: dict[str, Any], section: str) -> dict[str, Any]:
    from pydantic import ValidationError

    from pipeline.config import ConfigError, format_validation_error

    try:
        return schema.model_validate(values).model_dump()
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, schema).replace("config error: ", f"{section}.")) from None


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


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


def pinned_requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
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
    from pipeline.tracking import client

    try:
        run = client(tracking_uri).get_run(source)
    except Exception:  # noqa: BLE001 - MLflow raises RestException/MlflowException for an unknown id
        raise FlowrailError(f"'{source}' is neither a checkpoint path nor a run id on {tracking_uri}") from None
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


def register(checkpoint: str | Path, name: str, tracking_uri: str, *, run_id: str | None = None,
             experiment: str = "flowrail", aliases: list[str] | tuple[str, ...] = (),
             sampler: dict[str, Any] | None = None, guidance: dict[str, Any] | None = None,
             tags: dict[str, Any] | None = None) -> Registered:
    """Log ``checkpoint`` as a pyfunc model (into ``run_id``, else a new run), register a new version of ``name``,
    point ``aliases`` at it and tag the version with ``tags`` and the sampler settings."""
    import mlflow

    from pipeline.config import GuidanceConfig, SamplerConfig
    from pipeline.train.checkpoint import find_latest, read_meta

    ckpt = find_latest(checkpoint)
    meta = read_meta(ckpt)
    cfg = meta["config"]
    sampler = _validated(SamplerConfig, {**cfg["sampler"], **(sampler or {})}, "sampler")
    guidance = _validated(GuidanceConfig, {**cfg["guidance"], **(guidance or {})}, "guidance")
    data = meta["data"]
    image_shape = (int(data["channels"]), int(data["size"]), int(data["size"]))
    mlflow.set_tracking_uri(tracking_uri)  # the fluent log_model below writes to the current tracking URI
    return _log_and_register(ckpt, meta, name, tracking_uri, experiment, run_id, sampler, guidance, data,
                             image_shape, aliases, tags)


def _log_and_register(ckpt, meta, name, tracking_uri, experiment, run_id, sampler, guidance, data,  # noqa: ANN001, ANN202
                      image_shape, aliases, tags):
    from pipeline.tracking import client, ensure_experiment
    from pipeline.train.checkpoint import EMA_FILE, META

    c = client(tracking_uri)
    if run_id is None:
        exp_id = ensure_experiment(tracking_uri, experiment)
        run_id = c.create_run(exp_id, run_name=f"register-{name}", tags={"flowrail.job": "register",
                                                                          "flowrail.checkpoint": str(ckpt)}).info.run_id
        status_after = "FINISHED"
    else:
        status_after = c.get_run(run_id).info.status
    with tempfile.TemporaryDirectory(prefix="flowrail-register-") as tmp:
        art = Path(tmp) / "checkpoint"
        art.mkdir()
        for f in (META, EMA_FILE):
            shutil.copy2(ckpt / f, art / f)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=FlowrailImageModel(sampler, guidance),
                artifacts={"checkpoint": str(art)}, code_paths=[str(PACKAGE_DIR)],
                signature=signature(image_shape),
                input_example=input_example(int(data.get("num_classes") or 0), sampler, guidance["scale"]),
                pip_requirements=pinned_requirements(), registered_model_name=name)
    if status_after != "RUNNING":
        c.set_terminated(run_id, status=status_after)
    ver = str(info.registered_model_version)
    version_tags = {"flowrail.checkpoint": str(ckpt), "flowrail.step": meta["step"],
                    **{f"sampler.{k}": v for k, v in sampler.items()},
                    **{f"guidance.{k}": v for k, v in guidance.items()}, **(tags or {})}
    for k, v in version_tags.items():
        c.set_model_version_tag(name, ver, k, str(v))
    for alias in aliases:
        c.set_registered_model_alias(name, alias, ver)
    return Registered(name=name, version=ver, model_uri=f"models:/{name}/{ver}", run_id=run_id,
                      aliases=list(aliases))
