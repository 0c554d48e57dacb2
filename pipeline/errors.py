"""User-facing errors: the CLI prints their message as one line and exits with code 2."""
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class FlowrailError(Exception):
    """Bad input from the user (a config value, a path, a shard, a checkpoint); the message names the thing."""


class DataError(FlowrailError):
    """A shard set, a shard or a sample is missing, corrupt or of the wrong shape."""


class CheckpointError(FlowrailError):
    """A checkpoint is missing, incomplete or incompatible with the model configuration."""


def first_line(exc: BaseException, limit: int | None = 200, *, prefer: str | None = None) -> str:
    """One line of ``exc``'s message for a one-line error: the first line containing ``prefer`` if any, else the
    first non-blank line, else the exception's type name; cut to ``limit`` characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    chosen = next((ln for ln in lines if prefer in ln), None) if prefer else None
    text = chosen or (lines[0] if lines else type(exc).__name__)
    return text if limit is None else text[:limit]


def find_in_chain(exc: BaseException, types: type[E] | tuple[type[E], ...]) -> E | None:
    """The first exception of ``types`` reachable from ``exc``, depth first, or None.

    Follows ``__cause__`` and ``__context__``, the ``cause`` Ray attaches to a task's error, and the
    ``worker_failures`` of a Ray Train failure (one exception per failed worker); each exception is visited once.
    """
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, types) and not (isinstance(cause, types) and type(e).__name__.startswith("RayTaskError")):
            return e  # (Ray's RayTaskError(X) is also an X, with the whole remote traceback as its text: take X)
        failures = getattr(e, "worker_failures", None)
        inner = list(failures.values()) if isinstance(failures, dict) else []
        inner += [getattr(e, attr, None) for attr in ("__context__", "__cause__", "cause")]
        stack.extend(i for i in inner if isinstance(i, BaseException))
    return None


def user_error_in(exc: BaseException) -> BaseException | None:
    """The one-line user error (a :class:`FlowrailError`, ``PermissionError`` or ``FileNotFoundError``) behind a Ray
    task failure, as a fresh exception holding only its first line, or None.

    Ray appends retry notes to an error's text and, across processes, may keep a task's original exception only as
    text in the remote traceback; both are handled."""
    import re

    types = (FlowrailError, PermissionError, FileNotFoundError)
    found = find_in_chain(exc, types)
    if found is not None:
        return type(found)(first_line(found, None))
    for line in reversed(str(exc).splitlines()):
        match = re.search(r"\b(DataError|CheckpointError|FlowrailError|PermissionError): (.+)$", line.strip())
        if match:
            kinds = {"DataError": DataError, "CheckpointError": CheckpointError, "PermissionError": PermissionError}
            return kinds.get(match.group(1), FlowrailError)(match.group(2))
    return None
