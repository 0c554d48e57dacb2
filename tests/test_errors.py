"""pipeline.errors: one-line messages keep the line that names the problem; the user error is found inside a wrapped failure."""
from __future__ import annotations

from pipeline.errors import first_line


def test_first_non_blank_line_cut_to_limit():
    exc = ValueError("\n  while parsing a block mapping\n  in 'config.yaml', line 3\n")
    assert first_line(exc) == "while parsing a block mapping"
    assert first_line(exc, 5) == "while"
    assert first_line(ValueError("x" * 500), None) == "x" * 500


def test_empty_message_gives_the_type_name():
    assert first_line(EOFError()) == "EOFError"
    assert first_line(RuntimeError("  \n ")) == "RuntimeError"


def test_preferred_line_wins_over_the_first():
    exc = RuntimeError("Error(s) in loading state_dict for SiT:\n\tsize mismatch for x_embedder.weight: copying a "
                       "param with shape [96, 4] ...")
    assert first_line(exc, prefer="size mismatch").startswith("size mismatch for x_embedder.weight")
    assert first_line(RuntimeError("Missing key(s)"), prefer="size mismatch") == "Missing key(s)"


def _raised_from(inner: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:  # noqa: BLE001
        return exc


class TaskError(Exception):
    """Like Ray's task errors: the original error is ``cause``, not ``__cause__``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("wrapped")
        self.cause = cause


class TrainingFailed(Exception):
    """Like Ray Train's failure: one exception per failed worker."""

    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("training failed")
        self.worker_failures = failures


def test_find_in_chain_follows_causes_ray_task_errors_and_worker_failures():
    from pipeline.errors import DataError, FlowrailError, find_in_chain

    data = DataError("shard a.tar: truncated")
    assert find_in_chain(data, FlowrailError) is data
    assert find_in_chain(_raised_from(data, RuntimeError("task failed")), FlowrailError) is data

    assert find_in_chain(RuntimeError("outer"), FlowrailError) is None
    assert find_in_chain(TaskError(TaskError(data)), DataError) is data

    missing = FileNotFoundError("ckpt/meta.json")
    failed = TrainingFailed({0: RuntimeError("peer closed"), 1: TaskError(missing)})
    assert find_in_chain(failed, (FlowrailError, FileNotFoundError)) is missing
    assert find_in_chain(failed, FlowrailError) is None


def test_find_in_chain_stops_on_a_cycle():
    from pipeline.errors import FlowrailError, find_in_chain

    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert find_in_chain(a, FlowrailError) is None


def test_fit_surfaces_the_user_error_of_a_failed_worker():
    """What ``fit`` re-raises from a Ray Train failure: a flowrail error or a file/permission error of a worker."""
    from pipeline.errors import CheckpointError
    from pipeline.train.trainer import _unwrap

    denied = PermissionError("/runs/ckpt: permission denied")
    assert _unwrap(TrainingFailed({0: _raised_from(denied, RuntimeError("in worker"))})) is denied
    bad = CheckpointError("checkpoint /runs/x: no meta.json")
    assert _unwrap(_raised_from(bad, RuntimeError("controller"))) is bad
    assert _unwrap(TrainingFailed({0: RuntimeError("NCCL timeout")})) is None
