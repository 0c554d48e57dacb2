"""``init_from=PATH``: start training from existing weights.

PATH may be a flowrail checkpoint (or a run directory holding some; its EMA of the trained parameters is loaded,
frozen parameters keep the values the model was built with), an official
SiT/DiT checkpoint file (``.pt``/``.pth`` dict with model/ema/opt/args, or a bare state dict) or a
``.safetensors`` export.

Before training, :func:`check_init_from` compares what the checkpoint was trained as (interpolant path,
prediction, learn_sigma, number of classes: an official file's ``args`` and tensor shapes, a flowrail
checkpoint's config) with the run's config. A difference is refused in one line unless
``init_from_override=true``; the import notes (what was adapted) are printed and logged to the MLflow run.
A file that does not say its path or prediction (a bare state dict such as SiT's released ``SiT-XL-2-256x256.pt``,
a ``.safetensors`` export) needs them declared (``init_from_path=``, ``init_from_prediction=``) or is refused;
learn_sigma and the class count are read from its tensor shapes.

An object-store ``init_from`` (``s3://``, ``gs://``: one checkpoint file) is fetched into a local cache by the
driver, which checks it before any worker starts; each worker reads the same cache (fetching it where the cache is
not shared).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from pipeline.config import TrainJobConfig
from pipeline.errors import CheckpointError

SIT_PATHS = {"linear": "linear", "gvp": "gvp", "vp": "vp"}  # SiT's args.path_type, lower-cased -> transport.path


@dataclass
class CheckpointFacts:
    """What a checkpoint was trained as (None: the checkpoint does not say)."""

    source: str
    path: str | None = None
    prediction: str | None = None
    learn_sigma: bool | None = None
    num_classes: int | None = None  # real classes (the null label not counted)
    null_row: bool | None = None  # does the label table hold a null row? (None: unknown, args absent)
    table_rows: int | None = None
    input_size: int | None = None
    notes: list[str] = field(default_factory=list)


def _is_flowrail(source: Path) -> bool:
    from pipeline.train.checkpoint_read import META

    return source.is_dir() and ((source / META).is_file() or any(source.rglob(META)))


def local_init_from(path: str) -> Path:
    """``path`` itself, or for an object-store file its local copy (fetched once into the cache, keyed by URL)."""
    import hashlib
    import os

    from pipeline.data import storage
    from pipeline.tracking import redact

    if not storage.is_remote(path):
        return Path(storage.local_path(path))
    shown = redact(path)  # user-info in the URL never reaches a message or the cache's folder name
    root = Path(os.environ.get("FLOWRAIL_CACHE") or Path.home() / ".cache" / "flowrail") / "init_from"
    target = root / hashlib.sha256(shown.encode()).hexdigest()[:16] / Path(path.rstrip("/")).name
    if target.is_file():
        return target
    try:
        found = storage.exists(path)
    except Exception as exc:  # noqa: BLE001 - a DataError naming the store, or pyarrow's own
        raise CheckpointError(f"init_from={shown}: {redact(' '.join(str(exc).split()))[:200]}") from None
    if not found:
        raise CheckpointError(f"init_from={shown}: no such file on the object store (an object-store init_from is "
                              "one checkpoint file: .pt, .pth or .safetensors)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    with storage.open_input(path) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    tmp.replace(target)
    return target


def checkpoint_facts(path: str, declared_path: str | None = None,
                     declared_prediction: str | None = None) -> CheckpointFacts:
    """Read the training facts of a flowrail or official checkpoint (no model is built); ``declared_*``: what the
    config declares (``init_from_path``/``init_from_prediction``) for a file that does not say it."""
    source = local_init_from(path)
    if not source.exists():
        raise CheckpointError(f"init_from={path}: file or directory does not exist")
    if _is_flowrail(source):
        from pipeline.train.checkpoint_read import find_latest, read_meta

        ckpt = find_latest(source)
        meta = read_meta(ckpt)
        conf, data = meta.get("config", {}), meta.get("data", {})
        tr, model = conf.get("transport", {}), conf.get("model", {})
        _declared_agrees(path, "init_from_path", declared_path, tr.get("path"))
        _declared_agrees(path, "init_from_prediction", declared_prediction, tr.get("prediction"))
        return CheckpointFacts(source=f"flowrail checkpoint {ckpt}", path=tr.get("path"),
                               prediction=tr.get("prediction"), learn_sigma=model.get("learn_sigma"),
                               num_classes=data.get("num_classes"), null_row=True, input_size=data.get("size"))
    from pipeline.models.checkpoint_import import infer_sit_config, read_state_dict, table_has_null_row

    try:
        state, report = read_state_dict(source)
    except (ValueError, FileNotFoundError) as exc:
        raise CheckpointError(f"init_from={path}: {exc}") from None
    args = report.args
    facts = CheckpointFacts(source=f"official checkpoint {source}")
    path_type = args.get("path_type")
    if isinstance(path_type, str):
        facts.path = SIT_PATHS.get(path_type.lower(), path_type.lower())
    if isinstance(args.get("prediction"), str):
        facts.prediction = args["prediction"].lower()
    try:
        arch = infer_sit_config(state, args)
    except ValueError:
        arch = {}
    facts.learn_sigma = args.get("learn_sigma") if isinstance(args.get("learn_sigma"), bool) else arch.get("learn_sigma")
    facts.null_row = table_has_null_row(state, args)
    if "num_classes" in arch:
        facts.table_rows = int(state["y_embedder.embedding_table.weight"].shape[0])
        facts.num_classes = arch["num_classes"]
        if facts.null_row is False:
            facts.notes.append(f"label table has no null row ({facts.table_rows} classes): trained without "
                               "class dropout; the null row keeps its initialisation")
    facts.input_size = arch.get("input_size")
    _declared_agrees(path, "init_from_path", declared_path, facts.path)
    _declared_agrees(path, "init_from_prediction", declared_prediction, facts.prediction)
    facts.path = facts.path or declared_path
    facts.prediction = facts.prediction or declared_prediction
    unknown = [k for k, v in (("init_from_path", facts.path), ("init_from_prediction", facts.prediction)) if v is None]
    if unknown:
        sigma = "" if facts.learn_sigma is None else \
            f"; learn_sigma={str(facts.learn_sigma).lower()} is read from its shapes"
        what = "a bare state dict" if not args else "its args"
        raise CheckpointError(
            f"init_from={_shown(path)}: {what} does not say how it was trained: "
            f"declare {' and '.join(f'{k}=...' for k in unknown)} (init_from_path: linear/gvp/vp, "
            f"init_from_prediction: velocity/score/noise; SiT's released SiT-XL-2-256x256.pt is linear/velocity)"
            f"{sigma}")
    return facts


def _declared_agrees(path: str, key: str, declared: str | None, said: str | None) -> None:
    """A declaration for a file that says it itself must agree with it (one-line refusal otherwise)."""
    if declared is not None and said is not None and declared != said:
        raise CheckpointError(f"init_from={_shown(path)}: {key}={declared} but the checkpoint itself says {said}")


def _shown(path: str) -> str:
    from pipeline.tracking import redact

    return redact(path)


def mismatches(facts: CheckpointFacts, cfg: TrainJobConfig, num_classes: int) -> list[str]:
    """What the checkpoint was trained as that this config would use differently (empty: all agree)."""
    out = []
    if facts.path is not None and facts.path != cfg.transport.path:
        out.append(f"transport.path={cfg.transport.path} but the checkpoint was trained on path {facts.path}")
    if facts.prediction is not None and facts.prediction != cfg.transport.prediction:
        out.append(f"transport.prediction={cfg.transport.prediction} but the checkpoint predicts {facts.prediction}")
    if facts.learn_sigma is not None and facts.learn_sigma != cfg.model.learn_sigma:
        out.append(f"model.learn_sigma={str(cfg.model.learn_sigma).lower()} but the checkpoint has "
                   f"learn_sigma={str(facts.learn_sigma).lower()}")
    if facts.null_row is None and facts.table_rows is not None:  # no args: with or without a null row
        if num_classes not in (facts.table_rows - 1, facts.table_rows):
            out.append(f"the data have {num_classes} classes but the checkpoint's label table has "
                       f"{facts.table_rows} rows ({facts.table_rows - 1} classes + null)")
    elif facts.num_classes is not None and facts.num_classes != num_classes:
        out.append(f"the data have {num_classes} classes but the checkpoint has {facts.num_classes}")
    return out


def check_init_from(cfg: TrainJobConfig, num_classes: int) -> list[str]:
    """Refuse (one line) an ``init_from`` checkpoint trained differently from ``cfg`` unless
    ``init_from_override=true``; returns the import notes to print and log."""
    if not cfg.init_from or cfg.model.name.lower() == "flux":
        return []  # FLUX's path and prediction are fixed; its weights are checked when loaded
    facts = checkpoint_facts(cfg.init_from, cfg.init_from_path, cfg.init_from_prediction)
    found = mismatches(facts, cfg, num_classes)
    if found and not cfg.init_from_override:
        raise CheckpointError(f"init_from={_shown(cfg.init_from)}: {found[0]}"
                              + (f" (and {len(found) - 1} more differences)" if len(found) > 1 else "")
                              + "; match the config to the checkpoint, or set init_from_override=true to adapt it")
    notes = [f"overridden: {m}" for m in found] + facts.notes
    if facts.learn_sigma is not None and facts.learn_sigma != cfg.model.learn_sigma:
        notes.append("learn_sigma: the checkpoint's sigma half is dropped" if facts.learn_sigma
                     else "learn_sigma: the model's sigma half is zero-filled")
    if facts.input_size is not None and cfg.data.image_size and facts.input_size != cfg.data.image_size:
        notes.append(f"pos_embed: checkpoint input {facts.input_size}, data {cfg.data.image_size}: "
                     "the model's fixed sin-cos table is kept")
    return notes


def inherited_privacy(cfg: TrainJobConfig) -> dict:
    """``{"privacy": ...}`` for every checkpoint of a run whose weights descend from a privacy-stage checkpoint
    (``init_from``, or the flow-map teacher), else ``{}``.

    A model fine-tuned or distilled from a privacy-stage model carries what that model learnt from the sensitive
    data, so its checkpoints keep the stage's marker (and the release it was trained on, for the audit) and pass the
    audit gate before any sample grid or registration leaves the stage. ``lineage`` lists the checkpoints it
    descends from, nearest first.
    """
    from pipeline.train.checkpoint_read import find_latest, read_meta

    sources = [cfg.init_from]
    if cfg.flow_map.target == "teacher":
        sources.insert(0, cfg.flow_map.teacher)
    for source in sources:
        if not source or "://" in source or not _is_flowrail(Path(source)):
            continue
        ckpt = find_latest(Path(source))
        section = read_meta(ckpt).get("privacy")
        if section is not None:
            lineage = [str(ckpt), *section.get("lineage", [])]
            return {"privacy": {**section, "inherited_from": str(ckpt), "lineage": lineage}}
    return {}


def initialise_from(model: nn.Module, path: str, override: bool = False) -> str:
    """Load weights into ``model`` in place; returns a one-line description of what was loaded (with its notes).

    ``override``: a different class count re-initialises the class rows (the null row is kept) instead of failing.
    """
    from safetensors.torch import load_file

    from pipeline.train.checkpoint_read import EMA_FILE, find_latest
    from pipeline.train.ema import load_ema_weights

    source = local_init_from(path)
    if not source.exists():
        raise CheckpointError(f"init_from={path}: file or directory does not exist")
    if _is_flowrail(source):
        ckpt = find_latest(source)
        missing, unexpected = load_ema_weights(model, load_file(str(ckpt / EMA_FILE)))
        if missing or unexpected:
            raise CheckpointError(f"init_from={path}: checkpoint does not fit the model "
                                  f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        return f"EMA weights of flowrail checkpoint {ckpt}"
    from pipeline.models.checkpoint_import import load_official_checkpoint

    try:
        report = load_official_checkpoint(source, model, use_ema=True, new_classes="reinit" if override else "error")
    except ValueError as exc:
        raise CheckpointError(f"init_from={path}: {exc}") from None
    notes = f"; notes: {'; '.join(report.notes)}" if report.notes else ""
    return f"official checkpoint {source} ({report.loaded} tensors){notes}"



def log_import_notes(notes: list[str], tracking_uri: str, run_id: str) -> None:
    """Print the import notes and log them to the MLflow run (tag ``flowrail.init_from_notes`` + a text file)."""
    if not notes:
        return
    from pipeline.tracking import client

    for note in notes:
        print(f"[flowrail] init_from: {note}", flush=True)
    c = client(tracking_uri)
    c.set_tag(run_id, "flowrail.init_from_notes", "; ".join(notes)[:5000])
    c.log_text(run_id, "\n".join(notes) + "\n", "init_from_notes.txt")
