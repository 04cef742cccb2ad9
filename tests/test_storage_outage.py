"""Object storage goes away while checkpoints are being uploaded: each rank's upload retries with
backoff (train.upload_timeout_s) instead of failing the step, and the run finishes with every
checkpoint in storage. A real S3 endpoint (moto's server on loopback) stopped and restarted on the
same port during a 2-worker ZeRO-3 run that checkpoints to it."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest
from conftest import free_port
from test_pretrain import job_cmd, kill_session, ride_out, tiny_overrides
from train_callbacks import override as callbacks

pytestmark = pytest.mark.slow
STEPS = 8


def test_checkpoint_upload_waits_out_a_storage_outage(tmp_path):
    import s3fs
    from moto.server import ThreadedMotoServer

    from pipeline.data import write_demo_shards

    data = str(tmp_path / "demo")
    write_demo_shards(data, num_train=256, num_val=64, image_size=32, samples_per_shard=32)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": endpoint})
    bucket = f"outage-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    snapshot = f"{bucket}/runs/st/checkpoint_manager_snapshot.json"
    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen(job_cmd(*tiny_overrides(data, f"s3://{bucket}/runs", "st", f"sqlite:///{tmp_path}/m.db",
                                                   steps=STEPS),
                                   "train.upload_timeout_s=120", "tracking.system_metrics=false",
                                   callbacks(("StepSleep", {"seconds": 1.0}))),
                           cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 420
        while True:                           # the first checkpoint is in: now take storage away
            fs.invalidate_cache()
            if fs.exists(snapshot):
                break
            assert job.poll() is None and time.time() < deadline, open(tmp_path / "job.log").read()[-3000:]
            time.sleep(0.5)

        def restart():                        # same port, same state: moto's backends are global
            new = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
            new.start()
            return new
        # 7 s: at least one more checkpoint falls into the outage
        out, server = ride_out(job, tmp_path / "job.log", server.stop, restart, 7)
    finally:
        kill_session(job)                     # a no-op when it has finished
        log.close()
    try:
        assert "storage unreachable" in out and "uploaded after storage came back" in out, out[-3000:]
        fs.invalidate_cache()
        cks = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/runs/st") if "/checkpoint_0" in p)
        assert cks == ["checkpoint_00000006", "checkpoint_00000008"], cks
        state = json.loads(fs.cat(f"{bucket}/runs/st/checkpoint_00000008/train_state.json"))
        assert state["step"] == STEPS and state["samples_seen"] == STEPS * 16
    finally:
        server.stop()
