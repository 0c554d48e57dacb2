"""An MLflow server that goes away mid-run (stopped, then restarted on the same port): with the default settings
(``tracking.on_unreachable=buffer``, MLflow's own retries on) training goes on and every metric is logged once the
server is back; buffered metrics outlive a restarted rank 0 through the run's spool file."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import _free_port, tiny_train_overrides


class Server:
    """A real ``mlflow server`` on a fixed port that can be stopped and started again."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three MLflow server starts and a run: over 600 s on a loaded 2-core machine
def test_default_run_survives_tracking_server_down_10s(ray_local, digits_shards, tmp_path):
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.train.trainer import fit

    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server")
    server.start()
    cfg = load_config(TrainJobConfig, "train", tiny_train_overrides(digits_shards, tmp_path, run_name="buffered", **{
        # 100 steps: still training when the outage begins (20 steps once finished 0.03 s before the server stopped)
        "tracking.tracking_uri": server.uri, "train.steps": 100}))  # tracking.* and train.max_failures: defaults
    events: dict[str, object] = {}

    def outage() -> None:
        """Stop the server as soon as the first loss arrives; bring it back a little later."""
        client = MlflowClient(server.uri)
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                runs = client.search_runs([client.get_experiment_by_name("flowrail").experiment_id])
                if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                    events["seen_before_stop"] = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
                    break
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.2)
        server.stop()
        events["stopped"] = time.time()
        time.sleep(10)
        events["restarting"] = time.time()
        server.start()
        events["restarted"] = time.time()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        result = fit(cfg, make_grid=False)
        thread.join(timeout=600)
    finally:
        server.stop()
    assert "restarted" in events and events["seen_before_stop"] and max(events["seen_before_stop"]) < 100
    server.start()
    try:
        client = MlflowClient(server.uri)
        history = client.get_metric_history(result.run_id, "loss")
        steps = sorted(m.step for m in history)
        assert steps == list(range(5, 105, 5)), steps  # logged late, with their original steps, none lost
        # at least one of them was computed while no server was listening (its original timestamp is kept): it was
        # buffered by the worker and sent when the server came back
        down = [m.step for m in history if events["stopped"] <= m.timestamp / 1000 < events["restarting"]]
        assert down, ([(m.step, m.timestamp / 1000) for m in history], events)
        assert client.get_run(result.run_id).info.status == "FINISHED"
    finally:
        server.stop()


def test_server_gone_after_training_is_one_line_naming_it(tmp_path, monkeypatch, trained_digits):
    """Training finished, then the server is gone for the run's last calls (grid, status): one line that names the
    server (credentials redacted) and the kept checkpoint, not MLflow's own traceback."""
    from pipeline.tracking import TrackingError
    from pipeline.train.trainer import TrainResult, finish_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg, result = trained_digits
    dead = f"http://user:secret@127.0.0.1:{_free_port()}"
    out = TrainResult(run_id=result.run_id, checkpoint=result.checkpoint, metrics={}, tracking_uri=dead)
    with pytest.raises(TrackingError) as err:
        finish_run(cfg, out, make_grid=True)
    message = str(err.value)
    assert "\n" not in message and "secret" not in message and "127.0.0.1" in message
    assert str(result.checkpoint) in message and result.checkpoint.is_dir()
    assert out.grid is None  # the grid was drawn locally, but never reported as logged


def test_buffered_metrics_survive_a_restart_through_the_runs_spool(tmp_path, capsys):
    """Rank 0 records metrics while the server is unreachable, then dies: a new rank 0 (restarted worker group or
    re-run) reads the spool from the run's storage and sends them with their original steps and timestamps."""
    from pipeline.tracking import MetricLogger, few_retries

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(store).create_run(MlflowClient(store).create_experiment("spool")).info.run_id
    spool = tmp_path / "ray" / "run" / "pending_metrics.jsonl"
    dead = f"http://127.0.0.1:{_free_port()}"
    first = MetricLogger(dead, run_id, "buffer", grace_s=0, spool=spool)
    with few_retries(retries=0, timeout_s=2):
        first.log({"loss": 0.5, "samples_per_s": 10.0}, step=5)
        first.log({"loss": 0.25}, step=10)
    assert len(first.pending) == 3 and len(spool.read_text().splitlines()) == 3
    buffered = [ln for ln in capsys.readouterr().out.splitlines() if "buffered" in ln]
    assert len(buffered) == 1 and str(spool) in buffered[0], buffered  # one line, at the first failure only
    stamps = {(m.key, m.step): m.timestamp for m in first.pending}
    del first  # the process is gone; only the spool remains

    time.sleep(0.05)
    second = MetricLogger(store, run_id, "buffer", grace_s=0, spool=spool)
    assert second.recovered == 3
    second.log({"loss": 0.125}, step=15)
    assert not spool.exists() and second.pending == []
    history = MlflowClient(store).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [5, 10, 15]
    assert {(m.key, m.step): m.timestamp for m in history if m.step < 15} == \
        {k: v for k, v in stamps.items() if k[0] == "loss"}
    # sending the same metric twice (a crash between "sent" and "spool rewritten") leaves one value per step
    again = MetricLogger(store, run_id, "buffer")
    again.pending = list(MlflowClient(store).get_metric_history(run_id, "loss"))
    assert again.flush()
    assert sorted(m.step for m in MlflowClient(store).get_metric_history(run_id, "loss")) == [5, 10, 15]


def test_failed_run_status_against_a_dead_server_is_one_line(capsys):
    """After a training failure the driver marks the run FAILED; if the server is gone too, one printed line and
    no MLflow traceback, and the process-wide MLflow retry setting is left as it was."""
    import os

    from pipeline.tracking import mark_terminated

    before = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    assert mark_terminated(f"http://user:pw@127.0.0.1:{_free_port()}", "abc123", "FAILED") is False
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(out) == 1 and "could not mark MLflow run abc123 FAILED" in out[0] and "pw@" not in out[0], out
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == before


def test_safe_defaults():
    """A default run buffers metrics through a tracking outage and restarts its workers up to 3 times."""
    from pipeline.config import TrainJobConfig

    cfg = TrainJobConfig()
    assert (cfg.tracking.on_unreachable, cfg.train.max_failures) == ("buffer", 3)


def test_a_driver_killed_while_its_run_was_set_up_resumes_that_run(tmp_path, monkeypatch):
    """The run record is written right after the MLflow run is created: a driver killed while the params are logged
    leaves a run its re-run finds and finishes setting up (the killed sweep left a second, orphan run before)."""
    from pipeline import tracking
    from pipeline.config import TrainJobConfig

    cfg = TrainJobConfig(run_dir=str(tmp_path), run_name="killed-early",
                         tracking={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    real_set_up = tracking._set_up

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the driver dies here, after create_run
    monkeypatch.setattr(tracking, "_set_up", killed)
    with pytest.raises(KeyboardInterrupt):
        tracking.start_or_resume_run(cfg)
    monkeypatch.setattr(tracking, "_set_up", real_set_up)
    run_id, resumed = tracking.start_or_resume_run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert resumed and [r.info.run_id for r in runs] == [run_id]  # one run, the first one
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == str(cfg.train.lr) and tracking.SET_UP_TAG in run.data.tags


def test_failure_count_resets_after_a_send_goes_through(tmp_path, capsys):
    """Two outages of one run: each prints its line when it starts and when it ends, ``failures`` is 0 again once
    the server takes metrics, and a failing loop's last send (``send_after_failure``) is attempted after a
    recovered outage (before, the count stayed > 0 and that send was skipped)."""
    from pipeline.tracking import MetricLogger
    from pipeline.train.worker import send_after_failure

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(store).create_run(MlflowClient(store).create_experiment("reset")).info.run_id
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens: refused at once
    logger = MetricLogger(store, run_id, "buffer", grace_s=1, spool=tmp_path / "spool.jsonl")
    for outage, step in ((1, 5), (2, 15)):
        logger.uri = dead  # the server goes away ...
        logger.log({"loss": 1.0 / step}, step=step)
        assert logger.failures == 1 and len(logger.pending) == 1
        logger.uri = store  # ... and comes back
        logger.log({"loss": 1.0 / (step + 5)}, step=step + 5)
        assert logger.failures == 0 and logger.pending == [], outage
    out = capsys.readouterr().out
    assert out.count("unreachable: 1 metric values buffered") == 2, out
    assert out.count("reachable again") == 2, out
    logger.record({"loss": 0.01}, step=25)  # the loop fails with this window unsent: its last act sends it
    send_after_failure(logger)
    steps = sorted(m.step for m in MlflowClient(store).get_metric_history(run_id, "loss"))
    assert steps == [5, 10, 15, 20, 25], steps


class BlackHole:
    """A TCP server that accepts connections and never answers: an unresponsive (not refusing) tracking server."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.mark.timeout(120)
def test_final_send_to_an_unresponsive_server_is_bounded_by_buffer_grace_s(tmp_path, capsys):
    """A run's final flush against a server that accepts and never answers returns within ``grace_s`` (+ one
    request's rounding and the 1 s pause), not after MLflow's 120 s request timeout x 8 attempts; so does a send
    started during the loop (its timeout is ``grace_s``); the metrics stay in the spool."""
    import os

    from pipeline.tracking import MetricLogger

    hole = BlackHole()
    before = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")}
    try:
        logger = MetricLogger(hole.uri, "0" * 32, "buffer", grace_s=3, spool=tmp_path / "spool.jsonl")
        logger.record({"loss": 0.5}, step=5)
        start = time.monotonic()
        assert logger.flush() is False  # a send during the loop: one request, timeout grace_s
        during = time.monotonic() - start
        start = time.monotonic()
        assert logger.flush(final=True) is False
        final = time.monotonic() - start
    finally:
        hole.close()
    assert during < 3 + 2, during
    assert final < 3 + 3, final
    assert len(hole.held) >= 2  # the requests did reach the server (and were never answered)
    assert len((tmp_path / "spool.jsonl").read_text().splitlines()) == 1
    assert {k: os.environ.get(k) for k in before} == before  # the bound lasts only as long as the send
