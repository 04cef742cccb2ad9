"""`ray job submit` against a Ray head this test starts (own ports, own temp dir, token auth on);
the head is stopped by killing the session it runs in - never `ray stop`, which would stop every
Ray on this shared host."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from conftest import free_port
from test_pretrain import ROOT, kill_session, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head():
    venv_bin = os.path.dirname(sys.executable)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    token = uuid.uuid4().hex + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{venv_bin}:{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--node-manager-port": free_port(),
             "--object-manager-port": free_port(), "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    # worker ports below the kernel's ephemeral range (where free_port's come from), clear of them
    low = random.randrange(20000, 29900, 100)
    while any(low <= p <= low + 99 for p in ports.values()):
        low = random.randrange(20000, 29900, 100)
    ports.update({"--min-worker-port": low, "--max-worker-port": low + 99})
    cmd = [os.path.join(venv_bin, "ray"), "start", "--head", "--block", "--num-cpus", "2",
           "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir, "--disable-usage-stats"]
    for k, v in ports.items():
        cmd += [k, str(v)]
    head_log = os.path.join(temp_dir, "head.log")
    head = subprocess.Popen(cmd, env=env, stdout=open(head_log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        import urllib.error
        import urllib.request

        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:      # answering (401 without a token): up
                break
            except OSError:
                if head.poll() is not None or time.time() - t0 > 180:
                    raise AssertionError("Ray head did not come up:\n" + open(head_log).read()[-3000:])
                time.sleep(1)
        yield {"address": address, "env": env}
    finally:
        kill_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_with_token_auth(ray_head, tmp_path):
    from pipeline.data import write_demo_shards

    root = str(tmp_path / "demo")
    write_demo_shards(root, num_train=128, num_val=32, image_size=32, samples_per_shard=32)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = tiny_overrides(root, str(tmp_path / "runs"), "submitted", uri, steps=2)
    runtime_env = json.dumps({"excludes": [".git", ".venv", ".cache", "data", "runs", "*.db"]})
    base = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit",
            "--address", ray_head["address"]]
    # without the token the job server refuses the client
    env_no_token = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_TOKEN",)}
    env_no_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "missing_token")
    denied = subprocess.run(base + ["--no-wait", "--", "python", "-c", "pass"], env=env_no_token,
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0
    r = subprocess.run(base + ["--working-dir", ROOT, "--runtime-env-json", runtime_env, "--",
                               "python", "jobs/pretrain.py", *overrides],
                       env=ray_head["env"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out and "== pretraining finished ==" in out
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("test-pretrain").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["train/samples_seen"] == 2 * 16
    assert os.path.exists(tmp_path / "runs" / "submitted" / "weights" / "model.safetensors")
