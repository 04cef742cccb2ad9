"""Shared fixtures: real components on loopback, each test isolated from the host.

- ``s3_endpoint``: moto's ThreadedMotoServer, a real S3 HTTP endpoint on 127.0.0.1,
  with credentials and endpoint exported the standard way (AWS_*), as s3fs's own tests do.
- ``ray_local``: a private local Ray instance (own temp dir, never attaches to /tmp/ray).
- ``mlflow_uri``: a fresh SQLite tracking store.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "torch_extensions"))
# Keep Ray from attaching to a cluster another process on this shared host started.
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session", autouse=True)
def _job_logs():
    """Jobs write their full logs here (not into the checkout); removed at the end of the session.
    Made by the fixture, not at import: conftest may be imported more than once."""
    log_dir = tempfile.mkdtemp(prefix="coatnet-logs-")
    os.environ["COATNET_LOG_DIR"] = log_dir
    yield log_dir
    shutil.rmtree(log_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the session; tests create their own buckets."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield {"endpoint_url": f"http://127.0.0.1:{port}", "server": server, "port": port}
    server.stop()


@pytest.fixture
def s3_endpoint(s3_server, monkeypatch):
    """Environment for a client of the loopback S3 server, and a fresh bucket name."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server["endpoint_url"],
        "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint_url"],
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint_url"]})
    fs.mkdir(bucket)
    yield {**s3_server, "bucket": bucket, "fs": fs, "env": env}
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def short_tmp():
    """A short temp dir: Ray's unix socket paths must stay under 107 characters."""
    d = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray instance for the session (2 CPUs, own temp dir)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    ray.init(address="local", num_cpus=2, _temp_dir=temp_dir, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def mlflow_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
