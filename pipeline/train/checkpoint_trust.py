"""Checkpoints are checked before anything in them is loaded: per-rank manifests of file hashes, optionally signed.

At save every rank writes ``manifest/rank<R>.json``: the SHA-256 of each file it wrote into the checkpoint
(rank 0's ``flowrail.json`` included, hashed before it is renamed into place) and, when the job has a checkpoint
key (``$FLOWRAIL_CHECKPOINT_KEY``, from the job's secret), ``HMAC-SHA256(key, canonical JSON of the manifest)``.
At resume, before DeepSpeed reads a byte, the ranks of each node split that node's files between them (file ``i``
to local rank ``i mod local_world``), hash them, and agree (one all-gather) that every file matches; a mismatch, a
file no manifest lists, a listed file that is missing, or (with a key) a manifest without a valid signature is one
:class:`CheckpointError` naming the file, on every rank.

What the check proves: without a key, that the files are the ones written (no corruption, no partial upload);
whoever can write the storage can also rewrite the manifests. With a key, that a flowrail job holding the key wrote
them. Either way the engine state is then read with ``torch.load(weights_only=True)`` and an allowlist of the
DeepSpeed classes its files hold (:func:`weights_only_engine_loads`), in place of DeepSpeed 0.19's
``weights_only=False``: a file that slipped past the check still cannot run code when it is unpickled.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import CheckpointError

MANIFEST_DIR = "manifest"
MANIFEST_FORMAT = "flowrail-manifest/1"
KEY_ENV = "FLOWRAIL_CHECKPOINT_KEY"
CHECKED = ("deepspeed", "torch_engine", "rng", "ema.safetensors", "flowrail.json")  # what flowrail loads


def signing_key() -> bytes | None:
    """The job's checkpoint key (``$FLOWRAIL_CHECKPOINT_KEY``), or None when the job has none."""
    value = os.environ.get(KEY_ENV, "")
    return value.encode() if value else None


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def _signature(key: bytes, payload: dict[str, Any]) -> str:
    return hmac.new(key, _canonical(payload), hashlib.sha256).hexdigest()


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _listed_files(root: Path) -> list[Path]:
    """The files of a checkpoint that flowrail loads (:data:`CHECKED`), sorted; temporary dot-files excluded."""
    out = []
    for name in CHECKED:
        top = root / name
        if top.is_file():
            out.append(top)
        elif top.is_dir():
            out += [p for p in top.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return sorted(out)


_OWNER = re.compile(r"(?<!mp_)rank_?(\d+)")


def owner(name: str) -> int:
    """The rank that writes checkpoint file ``name``: ``rng/rank3.pt`` and DeepSpeed's ``zero_pp_rank_3_...`` are
    rank 3's; files without a rank (``mp_rank_00_model_states.pt``, ``latest``, EMA, metadata) rank 0's."""
    match = _OWNER.search(Path(name).name)
    return int(match.group(1)) if match else 0


def write_manifest(local_dir: Path, rank: int, step: int, pending: dict[str, bytes] | None = None) -> Path:
    """Write ``manifest/rank<R>.json`` for the files this rank wrote into ``local_dir`` (by :func:`owner`, so
    ranks may share one directory), plus ``pending`` (files about to be written, by name and content); signed
    when the job has a key."""
    files = {_rel(p, local_dir): file_sha256(p) for p in _listed_files(local_dir)
             if owner(_rel(p, local_dir)) == rank}
    files.update({name: hashlib.sha256(data).hexdigest() for name, data in (pending or {}).items()})
    payload = {"format": MANIFEST_FORMAT, "rank": rank, "step": step, "files": files}
    key = signing_key()
    body = {"manifest": payload, "hmac_sha256": _signature(key, payload) if key else None}
    path = local_dir / MANIFEST_DIR / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)
    return path


def _manifests(ckpt: Path, world: int, key: bytes | None) -> dict[str, str] | None:
    """The union of the ranks' manifests (name -> sha256), signatures checked; None for a checkpoint written
    before manifests existed (accepted only without a key)."""
    paths = [ckpt / MANIFEST_DIR / f"rank{r}.json" for r in range(world)]
    if not any(p.is_file() for p in paths):
        if key is not None:
            raise CheckpointError(f"checkpoint {ckpt} has no signed manifest ({MANIFEST_DIR}/rank0.json) and this "
                                  f"job has a checkpoint key (${KEY_ENV}): refusing to load it")
        return None
    files: dict[str, str] = {}
    for r, path in enumerate(paths):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST_DIR}/{path.name} is missing")
        try:
            body = json.loads(path.read_text())
            payload = body["manifest"]
            listed = payload["files"]
            ok = payload.get("format") == MANIFEST_FORMAT and payload.get("rank") == r and isinstance(listed, dict)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST_DIR}/{path.name} is not a flowrail manifest")
        if key is not None and not hmac.compare_digest(str(body.get("hmac_sha256") or ""), _signature(key, payload)):
            raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST_DIR}/{path.name} is not signed with this job's "
                                  f"checkpoint key (${KEY_ENV}): refusing to load it")
        for name, digest in listed.items():
            if files.setdefault(name, digest) != digest:
                raise CheckpointError(f"checkpoint {ckpt}: two manifests disagree about {name}")
    return files


def _first_problem(ckpt: Path, world: int, local_rank: int, local_world: int) -> str:
    """This rank's share of the check: '' when its files match, else the one-line reason."""
    try:
        listed = _manifests(ckpt, world, signing_key())
        if listed is None:
            if local_rank == 0:
                print(f"[flowrail] checkpoint {ckpt} has no manifest (written before flowrail checked checkpoints): "
                      f"loading it unchecked, engine state weights-only", flush=True)
            return ""
        present = {_rel(p, ckpt) for p in _listed_files(ckpt)}
        unlisted = sorted(present - set(listed))
        if unlisted:
            return f"checkpoint {ckpt}: {unlisted[0]} is not in the checkpoint's manifest (added after it was written)"
        missing = sorted(set(listed) - present)
        if missing:
            return f"checkpoint {ckpt}: {missing[0]} is listed in its manifest but missing"
        for i, name in enumerate(sorted(listed)):
            if i % local_world == local_rank and file_sha256(ckpt / name) != listed[name]:
                return f"checkpoint {ckpt}: {name} does not match its manifest's SHA-256 (changed after it was written)"
        return ""
    except CheckpointError as exc:
        return str(exc)
    except OSError as exc:
        return f"checkpoint {ckpt} cannot be read for verification ({type(exc).__name__}: {exc})"


def _gather(problem: str) -> list[str]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [problem]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, problem)
    return [str(p) for p in out]


def local_placement() -> tuple[int, int]:
    """``(local rank, ranks on this node)`` from the launcher's variables (Ray Train, torchrun), else ``(0, 1)``:
    then this rank hashes every file itself."""
    try:
        return int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return 0, 1


def verify(ckpt: Path, world: int, local: tuple[int, int] | None = None) -> None:
    """Check ``ckpt`` against its manifests (collective: every rank calls it); raises the same one-line
    :class:`CheckpointError` on every rank when any rank found a problem."""
    local_rank, local_world = local or local_placement()
    problems = [p for p in _gather(_first_problem(Path(ckpt), world, local_rank, local_world)) if p]
    if problems:
        raise CheckpointError(problems[0])


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed 0.19 pickles into its ZeRO optimizer files (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``): plain data holders with no code on unpickling."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_engine_loads(engine: Any) -> Iterator[None]:
    """While inside, ``engine``'s DeepSpeed checkpoint reads use ``torch.load(weights_only=True)`` with
    :func:`deepspeed_safe_globals` allowed (DeepSpeed 0.19's ``TorchCheckpointEngine.load`` passes
    ``weights_only=False``). Every file ``load_checkpoint`` reads on flowrail's path (module states, ZeRO
    optimizer partitions) goes through that method. Engines without it (``train.engine=torch``) already load
    weights-only."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    target = getattr(engine, "checkpoint_engine", None)
    if not isinstance(target, TorchCheckpointEngine):
        yield
        return
    allowed = deepspeed_safe_globals()

    def load(path: str, map_location: Any = None) -> Any:
        import pickle

        from pipeline.errors import first_line

        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"checkpoint file {path} holds objects a weights-only load refuses "
                                  f"({first_line(exc, 160, prefer='Unsupported global')})") from None

    target.load = load  # an instance attribute over the class's method
    try:
        yield
    finally:
        del target.load
