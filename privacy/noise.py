"""The release noise: a keyed pseudo-random function of (secret, release-set id, sample key) (REFERENCE.md 7).

``eps(secret, rid, key) = standard normals of Philox(key = HMAC-SHA256(secret, "flowrail-noise/1" | rid | key)[:16])``.
HMAC makes the seed unpredictable without the secret and independent across release sets and samples; Philox is a
counter-based generator, so the draw is a pure function of that 128-bit key (same inputs, same noise; any other
release id or sample key, an independent draw). Nothing here stores or prints the secret.
"""
from __future__ import annotations

import hashlib
import hmac
import math

import numpy as np

DOMAIN = b"flowrail-noise/1"


def prf_key(secret: bytes, release_id: str, sample_key: str) -> int:
    """The 128-bit Philox key of one sample of one release set."""
    msg = DOMAIN + b"\0" + release_id.encode() + b"\0" + sample_key.encode()
    return int.from_bytes(hmac.new(secret, msg, hashlib.sha256).digest()[:16], "big")


def sample_noise(secret: bytes, release_id: str, sample_key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The one standard normal draw (float64) for ``sample_key`` in release set ``release_id``."""
    return np.random.Generator(np.random.Philox(key=prf_key(secret, release_id, sample_key))).standard_normal(shape)


def extra_std(s_from: float, s_to: float) -> float:
    """``sqrt(s_to^2 - s_from^2)``: the std to add to a level-``s_from`` copy so it becomes a level-``s_to`` copy
    (independent Gaussians add in variance)."""
    if not s_to > s_from:
        raise ValueError(f"a derived release needs a higher level: --noise-std {s_to} <= earlier level {s_from}")
    return math.sqrt(s_to * s_to - s_from * s_from)
