"""The MLflow tracking server goes away mid-run: training goes on, metrics are buffered and sent when
the server is back, and the run ends FINISHED. A real `mlflow server` on loopback (SQLite store,
proxied artifacts), stopped and restarted on the same port during a 2-worker ZeRO-3 run - which
trains on a weighted mixture of two datasets (per-source counts logged)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import free_port
from test_pretrain import job_cmd, kill_session, ride_out, tiny_overrides
from train_callbacks import override as callbacks

pytestmark = pytest.mark.slow
STEPS = 14


def start_server(tmp, port: int) -> subprocess.Popen:
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{tmp}/store.db",
                             "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=open(tmp / f"server-{port}-{time.time():.0f}.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise AssertionError("mlflow server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    """The server and its helper processes (one process group, ours)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_training_survives_a_tracking_server_outage(tmp_path, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    from pipeline.data import write_demo_shards

    data = str(tmp_path / "demo")
    write_demo_shards(data, num_train=256, num_val=64, image_size=32, samples_per_shard=32)
    # trained on a weighted mixture of two datasets (the same label space), validated on the first
    write_demo_shards(str(tmp_path / "other"), num_train=96, num_val=16, image_size=32, samples_per_shard=32,
                      seed=7)
    mixture = (f'data.sources=[{{root: {data}, weight: 0.75, name: main}}, '
               f'{{root: {tmp_path / "other"}, weight: 0.25, name: other}}]')
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen(job_cmd(*tiny_overrides(data, str(tmp_path / "runs"), "outage", uri, steps=STEPS),
                                   "train.checkpoint_every=0", "tracking.system_metrics=false", mixture,
                                   callbacks(("StepSleep", {"seconds": 1.0}))),
                           cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        c = MlflowClient(uri)
        deadline = time.time() + 420

        def logged_steps() -> list[int]:
            exp = c.get_experiment_by_name("test-pretrain")
            runs = c.search_runs([exp.experiment_id]) if exp else []
            return sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "train/loss")) if runs else []
        while len(logged_steps()) < 2:
            assert job.poll() is None and time.time() < deadline, open(tmp_path / "job.log").read()[-3000:]
            time.sleep(0.5)
        down_at, outage = time.time(), []     # the outage: several steps long, training goes on

        def back():
            started = start_server(tmp_path, port)
            outage.append(time.time() - down_at)
            return started
        out, server = ride_out(job, tmp_path / "job.log", lambda: stop_server(server), back, 8)
    finally:
        kill_session(job)                     # a no-op when it has finished
        log.close()
    try:
        assert "tracking server unreachable" in out and "buffered metrics sent" in out, out[-3000:]
        exp = c.get_experiment_by_name("test-pretrain")
        (run,) = c.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(1, STEPS + 1)), steps       # every step, the outage's included
        assert "train/dropped_metric_values" not in run.data.metrics
        # the mixture: both sources drawn, in proportion to their weights (within one batch per rank)
        main, other = run.data.metrics["data/main/samples"], run.data.metrics["data/other/samples"]
        assert main + other == STEPS * 16 and abs(main / (main + other) - 0.75) <= 1 / STEPS, (main, other)
        assert {a.path for a in c.list_artifacts(run.info.run_id, "weights")} == {"weights/model.safetensors"}
        print(f"outage of {outage[0]:.0f} s during a {STEPS}-step run: nothing lost")
    finally:
        stop_server(server)
