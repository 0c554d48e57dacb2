"""Decoding WebDataset members without ever running code from a shard.

Ray's default WebDataset decoder unpickles ``.pkl``/``.pickle`` members and ``torch.load``s ``.pt``/``.pth``
members (refused by default since Ray 2.5x, but switched back on by one environment variable). A shard set is
data from outside: flowrail passes :func:`safe_decode` or :func:`refuse_unsafe` as an explicit ``decoder=`` to every
``ray.data.read_webdataset`` call, and its own readers (:mod:`pipeline.data.tar_reader`,
:func:`pipeline.data.shards.iter_samples`) call :func:`check_member` for every member. A shard holding a
code-carrying member is refused with one line naming the member and the shard; nothing is deserialised.

Safe decodings: ``.npy`` with ``np.load(allow_pickle=False)``, ``.cls``/``.cls2`` as int, ``.txt``/``.text`` as
UTF-8, ``.json`` as JSON, ``.jpg``/``.png``/... through PIL into a uint8 array; anything else stays bytes.
"""
from __future__ import annotations

import io
import json
from typing import Any, Iterator

import numpy as np

from pipeline.errors import DataError

UNSAFE_EXTENSIONS = frozenset({"pkl", "pickle", "pt", "pth", "pyd", "joblib", "dill"})
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "ppm", "pgm", "pbm", "pnm", "webp", "bmp"})


def extension(field: str) -> str:
    """The last extension of a member's field name (``image.npy`` -> ``npy``, ``cls`` -> ``cls``), lower case."""
    return field.rsplit(".", 1)[-1].lower()


def check_member(field: str, key: str, url: str) -> None:
    """Refuse a member whose format deserialises code (pickle, torch.load) — one line naming member and shard."""
    if extension(field) in UNSAFE_EXTENSIONS:
        raise DataError(f"shard {url}: member {key}.{field} is a pickle/torch file; flowrail never unpickles shard "
                        "members (remove it from the shard set)")


def _check_sample(sample: dict[str, Any]) -> None:
    key, url = str(sample.get("__key__", "?")), str(sample.get("__url__", "?"))
    for field in sample:
        if not field.startswith("__"):
            check_member(field, key, url)


def refuse_unsafe(sample: dict[str, Any]) -> dict[str, Any]:
    """``read_webdataset`` decoder that keeps every member as bytes (the caller parses them) and refuses
    code-carrying members."""
    _check_sample(sample)
    return sample


def decode_value(field: str, data: bytes) -> Any:
    """One member's bytes decoded by its extension, never unpickling (see the module docstring)."""
    ext = extension(field)
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext in ("cls", "cls2"):
        return int(data.decode())
    if ext in ("txt", "text"):
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    if ext in IMAGE_EXTENSIONS:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)))
    return data


def safe_decode(sample: dict[str, Any]) -> dict[str, Any]:
    """``read_webdataset`` decoder: every member decoded by :func:`decode_value`; code-carrying members refused."""
    _check_sample(sample)
    return {field: value if field.startswith("__") or not isinstance(value, (bytes, bytearray))
            else decode_value(field, bytes(value)) for field, value in sample.items()}


def user_error(exc: BaseException) -> BaseException | None:
    """The one-line user error (a refused member, a corrupt shard) inside a Ray Data task failure, if any."""
    from pipeline.errors import user_error_in

    return user_error_in(exc)


def numpy_batches(ds: Any) -> Iterator[dict[str, Any]]:
    """``ds.iter_batches`` (numpy, whole blocks); a user error raised in a Ray Data task (a refused member, a
    corrupt shard) surfaces as itself, one line, instead of Ray's wrapped traceback."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as exc:  # noqa: BLE001 - Ray wraps the errors of its tasks
        found = user_error(exc)
        if found is None:
            raise
        raise found from None
