"""The worker hands recorded metrics to MLflow's send thread at most once per interval, never two sends at once."""
from __future__ import annotations

from concurrent.futures import Future

from pipeline.train.worker import METRIC_SEND_INTERVAL_S, send_due


def _done() -> Future:
    f: Future = Future()
    f.set_result(True)
    return f


def test_first_window_is_sent_at_once():
    assert send_due(None, final=False, sent_at=-float("inf"), now=0.0)


def test_windows_of_a_fast_loop_wait_for_the_interval():
    """A loop logging every 2 ms: of one second's 500 windows only the first is handed over."""
    sent_at, sends = -float("inf"), 0
    previous = None
    for i in range(500):
        now = i * 0.002
        if send_due(previous, final=False, sent_at=sent_at, now=now):
            previous, sent_at, sends = _done(), now, sends + 1
    assert METRIC_SEND_INTERVAL_S > 0.998 and sends == 1
    assert send_due(previous, final=False, sent_at=sent_at, now=sent_at + METRIC_SEND_INTERVAL_S)


def test_the_last_window_is_sent_at_once_but_never_beside_a_running_send():
    running: Future = Future()  # MLflow still retrying the previous send
    assert send_due(_done(), final=True, sent_at=10.0, now=10.001)
    assert not send_due(running, final=True, sent_at=10.0, now=10.001)  # the loop's final flush sends it after
    assert not send_due(running, final=False, sent_at=0.0, now=100.0)


def test_a_failing_loop_sends_what_it_recorded_and_never_raises_over_its_error(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import MetricLogger, TrackingError
    from pipeline.train.worker import send_after_failure

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sends")).info.run_id
    logger = MetricLogger(uri, run_id, "fail", spool=tmp_path / "spool.jsonl")
    logger.record({"bad_steps": 2.0}, step=4)  # recorded inside the send interval, not sent yet
    send_after_failure(logger)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "bad_steps")] == [(4, 2.0)]
    assert not logger.pending and not (tmp_path / "spool.jsonl").exists()

    class Unreachable:
        pending, failures, tries = ["x"], 0, 0

        def flush(self) -> bool:
            self.tries += 1
            raise TrackingError("MLflow tracking server http://127.0.0.1:9 is unreachable")

    gone = Unreachable()
    send_after_failure(gone)  # the loop's own error is the one that propagates
    assert gone.tries == 1
    gone.failures = 1  # a send already failed: no new attempt (MLflow's retries would take minutes)
    send_after_failure(gone)
    assert gone.tries == 1
