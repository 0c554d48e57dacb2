"""Import official SiT/DiT checkpoints into flowrail models, and export weights to safetensors.

Official files are either a training dict ``{"model", "ema", "opt", "args"}`` (``args`` an argparse Namespace) or a
bare (EMA) state dict. Loading is weights-only: ``torch.load(weights_only=True)`` with only ``argparse.Namespace``
allow-listed, or a ``.safetensors`` file.

Mismatches that have a well-defined meaning are handled explicitly and reported as notes:

- ``learn_sigma``: the final linear layer outputs ``p*p*C`` values ordered ``(p_row, p_col, channel)``; a checkpoint
  trained with ``learn_sigma`` has ``2C`` channels whose first ``C`` are the transport field. Loading it into a
  model without ``learn_sigma`` keeps those; the reverse zero-fills the (unused) sigma half.
- ``num_classes``: refused by default (the label table has ``num_classes + 1`` rows, the last one the null label);
  with ``new_classes="reinit"`` the class rows keep the model's fresh initialisation and the null row is copied.
  A checkpoint trained without class dropout has no null row (``num_classes`` rows): its class rows are copied
  and the model's null row keeps its initialisation (classifier-free guidance then needs fine-tuning first).
- ``pos_embed`` of another resolution: the model keeps its own fixed sin-cos table (it is not learned).

Everything else that does not match (missing, unexpected or differently shaped keys) raises one
:class:`CheckpointMismatchError` whose message lists all of them.
"""
from __future__ import annotations

import argparse
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pipeline.errors import first_line

STRIP_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model; the message names every mismatch."""


@dataclass
class ImportReport:
    source: str  # which entry of the file was used: "ema", "model", "state_dict" or "bare"
    loaded: int  # number of tensors copied from the checkpoint
    notes: list[str] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)  # the checkpoint's training args, if any


def _load_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:  # memory-mapped: reading the args and a few shapes does not page in the whole file
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"checkpoint {path} cannot be loaded weights-only (refusing arbitrary pickles): "
                         f"{first_line(exc, None)}") from None
    except (RuntimeError, EOFError) as exc:
        raise ValueError(f"checkpoint {path} is not a readable torch checkpoint: {first_line(exc, None)}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str | Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """The state dict inside an official checkpoint file (EMA weights by default), with DDP/compile prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = _load_file(path)
    args: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("args"), argparse.Namespace):
        args = vars(obj["args"])
    elif isinstance(obj, dict) and isinstance(obj.get("args"), dict):
        args = dict(obj["args"])
    order = ["ema", "model"] if use_ema else ["model", "ema"]
    order += ["state_dict", "module"]
    source, state = "bare", None
    if _is_state_dict(obj):
        state = obj
    elif isinstance(obj, dict):
        for key in order:
            if _is_state_dict(obj.get(key)):
                source, state = key, obj[key]
                break
    if state is None:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"checkpoint {path} holds no state dict (looked for ema/model/state_dict or a bare dict; "
                         f"found {found})")
    clean: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        clean[key] = value
    return clean, ImportReport(source=source, loaded=0, args=args)


def _patch_size(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    p = getattr(model, "patch_size", None)
    if p is None and "x_embedder.proj.weight" in state:
        p = state["x_embedder.proj.weight"].shape[-1]
    return int(p or 1)


def _resize_sigma(value: torch.Tensor, p: int, channels_to: int) -> torch.Tensor:
    """Keep the first ``channels_to`` output channels of a final layer (or zero-pad up to them)."""
    channels_from = value.shape[0] // (p * p)
    v = value.reshape(p, p, channels_from, *value.shape[1:])
    if channels_to <= channels_from:
        v = v[:, :, :channels_to]
    else:
        pad = torch.zeros(p, p, channels_to - channels_from, *value.shape[1:], dtype=value.dtype)
        v = torch.cat([v, pad], dim=2)
    return v.reshape(p * p * channels_to, *value.shape[1:]).contiguous()


def _sigma_pair(have: torch.Size, want: torch.Size, p: int) -> bool:
    """True when two final-layer shapes differ only by a learn_sigma doubling of the output channels."""
    if have[1:] != want[1:]:
        return False
    small, large = sorted((have[0], want[0]))
    return large == 2 * small and small % (p * p) == 0


def _short(items: list[str], limit: int = 8) -> str:
    head = ", ".join(items[:limit])
    return head + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module, *,
                     new_classes: Literal["error", "reinit"] = "error", source: str = "checkpoint",
                     no_null_row: bool | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit ``state`` to ``model``'s keys and shapes (see the module docstring); raise on anything else.

    ``no_null_row``: whether the checkpoint's label table lacks the null row (from its ``args.num_classes``);
    None: assumed when the table is exactly one row short of the model's.
    """
    target = model.state_dict()
    optional = tuple(getattr(model, "IMPORT_OPTIONAL_PREFIXES", ()))
    p = _patch_size(model, state)
    notes: list[str] = []
    out: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, value in state.items():
        if key not in target:
            continue
        want = target[key].shape
        if value.shape == want:
            out[key] = value
        elif key.startswith("final_layer.linear.") and _sigma_pair(value.shape, want, p):
            c_from, c_to = value.shape[0] // (p * p), want[0] // (p * p)
            out[key] = _resize_sigma(value, p, c_to)
            if key.endswith("weight"):
                notes.append("learn_sigma: checkpoint has the sigma half, model does not; it was dropped"
                             if c_from > c_to else "learn_sigma: model has a sigma half the checkpoint lacks; "
                             "it was zero-filled")
        elif (key == "y_embedder.embedding_table.weight" and value.shape[1:] == want[1:]
              and value.shape[0] == want[0] - 1 and no_null_row is not False):
            table = target[key].clone()
            table[: value.shape[0]] = value
            out[key] = table
            notes.append(f"num_classes: checkpoint table has {value.shape[0]} classes and no null-label row "
                         "(trained without class dropout); its classes were loaded, the null row keeps its "
                         "initialisation (fine-tune with class dropout before using guidance)")
        elif key == "y_embedder.embedding_table.weight" and value.shape[1:] == want[1:]:
            if new_classes == "reinit":
                table = target[key].clone()
                table[-1] = value[-1]
                out[key] = table
                notes.append(f"num_classes: checkpoint has {value.shape[0] - 1} classes, model {want[0] - 1}; "
                             "class embeddings re-initialised, null-label embedding kept")
            else:
                mismatched.append(f"{key}: num_classes mismatch, checkpoint has {value.shape[0] - 1} classes (+null), "
                                  f"model {want[0] - 1} (+null); pass new_classes='reinit' to fine-tune on new labels")
        elif key == "pos_embed" and value.shape[-1] == want[-1]:
            out[key] = target[key]
            notes.append(f"pos_embed: checkpoint grid of {value.shape[1]} tokens, model {want[1]}; "
                         "the model's fixed sin-cos table is kept (input size differs)")
        else:
            mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(want)}")
    unexpected = sorted(k for k in state if k not in target)
    missing = sorted(k for k in target if k not in state and not k.startswith(optional))
    fresh = sorted(k for k in target if k not in state and k.startswith(optional))
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_short(mismatched)}")
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        raise CheckpointMismatchError(f"{source} does not match the model: " + "; ".join(parts))
    for key in fresh:
        out[key] = target[key]
    if fresh:
        notes.append(f"{len(fresh)} tensors of new layers keep their initialisation ({_short(fresh, 4)})")
    return out, notes


def table_has_null_row(state: dict[str, torch.Tensor], args: dict[str, Any]) -> bool | None:
    """Whether the label table holds a null row, from ``args.num_classes`` (None when the args do not say)."""
    table = state.get("y_embedder.embedding_table.weight")
    classes = args.get("num_classes")
    if table is None or not isinstance(classes, int):
        return None
    return table.shape[0] == classes + 1


def load_official_checkpoint(path: str | Path, model: nn.Module, use_ema: bool = True,
                             new_classes: Literal["error", "reinit"] = "error") -> ImportReport:
    """Load an official SiT/DiT checkpoint (or a safetensors export) into ``model`` in place."""
    state, report = read_state_dict(path, use_ema=use_ema)
    has_null = table_has_null_row(state, report.args)
    adapted, notes = adapt_state_dict(state, model, new_classes=new_classes, source=f"checkpoint {path}",
                                      no_null_row=None if has_null is None else not has_null)
    model.load_state_dict(adapted, strict=True)
    report.loaded = sum(1 for k in adapted if k in state)
    report.notes = notes
    if hasattr(model, "after_import"):  # e.g. DFM zeroes stage layers a SiT checkpoint does not have
        model.after_import([k for k in adapted if k not in state])
    return report


def infer_sit_config(state: dict[str, torch.Tensor], args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Architecture facts readable from a SiT state dict (heads are not; they come from the named size).

    ``num_classes`` is ``args["num_classes"]`` when given (a table without a null row has exactly that many
    rows), else the table's rows minus the null row."""
    try:
        proj = state["x_embedder.proj.weight"]
        hidden, in_channels, p = proj.shape[0], proj.shape[1], proj.shape[-1]
        out_values = state["final_layer.linear.weight"].shape[0]
        tokens = state["pos_embed"].shape[1]
        num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
        if args and isinstance(args.get("num_classes"), int):
            num_classes = args["num_classes"]
    except KeyError as exc:
        raise ValueError(f"state dict is not in the SiT/DiT layout (no {exc.args[0]})") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = int(round(tokens ** 0.5))
    out_channels = out_values // (p * p)
    return {"hidden_size": hidden, "depth": depth, "patch_size": p, "in_channels": in_channels,
            "input_size": grid * p, "num_classes": num_classes, "learn_sigma": out_channels == 2 * in_channels}


def export_safetensors(model_or_state: nn.Module | dict[str, torch.Tensor], path: str | Path,
                       metadata: dict[str, str] | None = None) -> Path:
    """Write weights (contiguous CPU copies; shared tensors duplicated) to a ``.safetensors`` file."""
    from safetensors.torch import save_file

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path
