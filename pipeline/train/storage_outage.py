"""Riding out an outage of the run's checkpoint storage (an object store that stops answering for a while).

A worker whose checkpoint upload fails fails its worker group, and Ray Train restarts the group from the last
registered checkpoint (``train.max_failures``). But after registering a checkpoint, Ray Train's controller writes
the run's checkpoint record (``checkpoint_manager_snapshot.json``) to the same storage, and a failure there is a
``ControllerError`` that Ray Train does not retry: the whole run would end (observed with the store down for 10 s,
Ray 2.60). :func:`fit_through_outages` runs ``fit`` again after a backoff (5, 10, 20 ... s) when the failure is the
storage not answering; the same run name and storage make Ray Train restore the last record it stored, so the run
continues from its last stored checkpoint in the same MLflow run. At most ``train.max_failures`` such retries.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# what pyarrow's S3 filesystem (the AWS SDK's curl client) says when the endpoint refuses, drops or times out
_OUTAGE_MARKERS = ("AWS Error NETWORK_CONNECTION", "curlCode: 7,", "curlCode: 28,", "curlCode: 52,", "curlCode: 55,",
                   "curlCode: 56,")


def storage_outage(exc: BaseException) -> str | None:
    """The storage's "could not connect" message inside ``exc`` (a Ray Train failure), or None when ``exc`` is
    something else: a flowrail user error (a full store, bad config) is never an outage."""
    from pipeline.errors import FlowrailError, find_in_chain

    if find_in_chain(exc, FlowrailError) is not None:
        return None
    for error in _chain(exc):
        text = str(error)
        if any(marker in text for marker in _OUTAGE_MARKERS):
            line = next((ln for ln in text.splitlines() if any(m in ln for m in _OUTAGE_MARKERS)), text)
            return line.strip()[:300]
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (causes, contexts, Ray Train's controller and worker failures)."""
    out: list[BaseException] = []
    stack = [exc]
    while stack:
        e = stack.pop()
        if any(e is seen for seen in out):
            continue
        out.append(e)
        linked = [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        linked += list((getattr(e, "worker_failures", None) or {}).values())
        stack += [x for x in linked if isinstance(x, BaseException)]
    return out


def fit_through_outages(fit: Callable[[], T], storage: str, retries: int, first_wait_s: float = 5.0,
                        sleep: Callable[[float], None] = time.sleep) -> T:
    """``fit()``, run again after ``first_wait_s * 2**k`` s each time it fails because the remote ``storage`` did not
    answer, at most ``retries`` times (-1: always). Local storage and other failures are raised at once."""
    attempt = 0
    while True:
        try:
            return fit()
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a storage outage
            reason = storage_outage(exc) if "://" in storage else None
            if reason is None or (retries != -1 and attempt >= retries):
                raise
            wait = first_wait_s * 2 ** attempt
            attempt += 1
            print(f"[flowrail] checkpoint storage {storage} did not answer ({reason}); training again from its last "
                  f"stored checkpoint in {wait:.0f} s (retry {attempt} of "
                  f"{'unlimited' if retries == -1 else retries}, train.max_failures)", flush=True)
            sleep(wait)
