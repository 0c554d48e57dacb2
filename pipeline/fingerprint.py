"""Salted fingerprints of secrets-bearing strings (tracking URIs with a password in them).

A file that must recognise the same store later (``sweep.json``, a run record) keeps
``pbkdf2-sha256$<iterations>$<salt>$<digest>`` with a random 16-byte salt, digest = PBKDF2-HMAC-SHA256(value, salt):
unlike a bare SHA-256 of the URI, it cannot be looked up in a table or matched across files, and guessing the
password costs ``ITERATIONS`` hashes per guess.
"""
from __future__ import annotations

import hashlib
import hmac
import os

ITERATIONS = 100_000
SCHEME = "pbkdf2-sha256"


def salted_fingerprint(value: str, salt: bytes | None = None) -> str:
    """``pbkdf2-sha256$iterations$salt_hex$digest_hex`` of ``value`` (a fresh random salt unless given)."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", value.encode(), salt, ITERATIONS).hex()
    return f"{SCHEME}${ITERATIONS}${salt.hex()}${digest}"


def fingerprint_matches(value: str, fingerprint: str) -> bool:
    """Whether ``fingerprint`` (from :func:`salted_fingerprint`) was made from ``value``; False for anything else."""
    parts = str(fingerprint).split("$")
    if len(parts) != 4 or parts[0] != SCHEME or not parts[1].isdigit():
        return False
    try:
        salt = bytes.fromhex(parts[2])
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha256", value.encode(), salt, int(parts[1])).hex()
    return hmac.compare_digest(digest, parts[3])
