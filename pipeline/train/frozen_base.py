"""Lean checkpoints of frozen-base runs: the frozen parameters are not saved, the base is referenced instead.

A LoRA run's base (or any run with frozen parameters: SiT's sin-cos table) is rebuilt by constructing the model
(``flux.weights``, ``init_from``, fixed tables), so its checkpoints hold only the trained tensors and their optimizer
state (DeepSpeed's ``save_checkpoint(exclude_frozen_parameters=True)``, loaded with ``load_module_strict=False``).
The checkpoint's metadata records what the base was built from (:func:`base_reference`); a resume checks that this
run builds the same base before anything is loaded (:func:`check_base`).

The fingerprint of a weights path is SHA-256 over its transformer ``config.json`` and its weight files' names and
sizes (the registry's base reference uses the same function): hashing tens of GB at every checkpoint would take minutes, and
a swapped or re-downloaded different model changes it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pipeline.config import TrainJobConfig
from pipeline.errors import CheckpointError


def has_frozen(module: Any) -> bool:
    """Whether ``module`` has parameters that are not trained."""
    return any(not p.requires_grad for p in module.parameters())


def weights_fingerprint(path: Path) -> str:
    """SHA-256 over a weights folder's (or its ``transformer/``'s) ``config.json`` and its ``*.safetensors`` names
    and sizes; a single file: its name and size."""
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    h = hashlib.sha256()
    if folder.is_file():
        h.update(f"{folder.name}:{folder.stat().st_size}".encode())
        return h.hexdigest()
    if (folder / "config.json").is_file():
        h.update((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def base_reference(cfg: TrainJobConfig) -> dict[str, Any]:
    """What the frozen parameters are built from: the model, ``flux.weights`` with its fingerprint (FLUX) and
    ``init_from``."""
    ref: dict[str, Any] = {"model": cfg.model.name.lower(), "init_from": cfg.init_from}
    if ref["model"] == "flux":
        weights = cfg.flux.weights
        ref["flux_weights"] = weights
        ref["flux_weights_sha256"] = (weights_fingerprint(Path(weights))
                                      if weights and "://" not in str(weights) and Path(weights).exists() else None)
    return ref


def check_base(ckpt: Path, saved: dict[str, Any] | None, cfg: TrainJobConfig) -> None:
    """Refuse to resume a checkpoint without its frozen parameters when this run builds another base."""
    if not saved:
        return
    now = base_reference(cfg)
    if saved.get("flux_weights_sha256") and now.get("flux_weights_sha256") != saved["flux_weights_sha256"]:
        raise CheckpointError(f"checkpoint {ckpt} holds only the trained parameters of a base with fingerprint "
                              f"{saved['flux_weights_sha256'][:12]} (flux.weights={saved.get('flux_weights')}); this "
                              f"run's flux.weights={now.get('flux_weights')} is another model: resume with that base")
    if saved.get("init_from") != now.get("init_from"):
        raise CheckpointError(f"checkpoint {ckpt} holds only the trained parameters; its frozen ones came from "
                              f"init_from={saved.get('init_from')}, this run has init_from={now.get('init_from')}")
