"""An MLflow server that goes away mid-run (stopped, then restarted on the same port): with
``tracking.on_unreachable=buffer`` training goes on and every metric is logged once the server is back."""
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
def test_metrics_buffered_while_server_is_down(ray_local, digits_shards, tmp_path):
    from pipeline.config import TrainJobConfig, load_config
    from pipeline.train.trainer import fit

    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server")
    server.start()
    cfg = load_config(TrainJobConfig, "train", tiny_train_overrides(digits_shards, tmp_path, run_name="buffered", **{
        "tracking.tracking_uri": server.uri, "tracking.on_unreachable": "buffer", "tracking.buffer_grace_s": 300,
        "train.steps": 20}))
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
        time.sleep(8)
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
    assert "restarted" in events and events["seen_before_stop"] and max(events["seen_before_stop"]) < 20
    server.start()
    try:
        client = MlflowClient(server.uri)
        history = client.get_metric_history(result.run_id, "loss")
        steps = sorted(m.step for m in history)
        assert steps == [5, 10, 15, 20], steps  # logged late, with their original steps, none lost
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
