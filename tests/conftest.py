"""Shared fixtures: real components on loopback, each test isolated from the host.

- ``s3_endpoint``: moto's ThreadedMotoServer, a real S3 HTTP endpoint on 127.0.0.1,
  with credentials and endpoint exported the standard way (AWS_*), as s3fs's own tests do.
- ``ray_cluster``: a Ray head (``ray start --head``, token authentication on, own ports and temp
  dir) that the end-to-end jobs attach to through RAY_ADDRESS, as they would to a user's cluster;
  one per test session (per xdist worker).
- ``ray_local``: a private local Ray instance in this process (own temp dir, never attaches to /tmp/ray).
- ``mlflow_uri``: a fresh SQLite tracking store.

Helpers the tests share are in ``helpers.py``; the probes jobs run in their workers are in
``train_callbacks.py``. Under ``make test`` the suite runs on two xdist workers: one runs the files
with multi-process jobs one after another (``JOB_FILES``), the other everything else meanwhile.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid

import pytest
from helpers import RayHead, free_port

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "torch_extensions"))
# One ninja for every process that JIT-builds DeepSpeed's ops into that cache: the venv's (pip's
# ninja 1.13) ahead of the system's (1.11). Their build logs differ (v7 vs v5 hashes), so processes
# alternating between them rebuilt the shm comm op each time (~30-60 s of compiling, twice a suite).
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
# Keep Ray from attaching to a cluster another process on this shared host started.
os.environ.pop("RAY_ADDRESS", None)
# Ray Train's controller polls its workers every 2 s by default: the tests' runs are seconds long,
# so they would mostly wait on polls. Jobs inherit this and pass it on to their controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# Files whose tests run jobs of several processes (Ray Train workers, DeepSpeed ranks on gloo).
# Two such jobs at once on 2 cores slow each other many-fold (a rank waiting in a collective spins
# on the core its descheduled peer needs: 13 s alone became 158 s), so they run one after another
# on one xdist worker, longest first; every other file runs on the other worker meanwhile (there,
# two-rank DeepSpeed tests of a few seconds: test_capacity, test_finetune_init, test_engine_compile).
JOB_FILES = ["test_workflow.py", "test_pretrain_job.py", "test_resume_rerun.py", "test_cluster_rehearsal.py",
             "test_data_writer_ray.py"]
JOB_LANE = "end-to-end jobs"


def pytest_collection_modifyitems(config, items):
    """The job files first, in JOB_FILES order (a file's own order kept): xdist hands them out first."""
    items.sort(key=lambda item: (JOB_FILES.index(item.path.name) if item.path.name in JOB_FILES
                                 else len(JOB_FILES)))


def pytest_runtest_setup(item):
    """Under xdist, the worker that runs the other files gives way to the job lane: its jobs are
    latency-bound (ranks wait on each other), the quick tests only need the CPU the jobs leave."""
    if os.environ.get("PYTEST_XDIST_WORKER") and item.path.name not in JOB_FILES and os.getpriority(
            os.PRIO_PROCESS, 0) < 10:
        os.setpriority(os.PRIO_PROCESS, 0, 10)       # once; inherited by what its tests start


def pytest_xdist_make_scheduler(config, log):
    """``make test``'s scheduler: the job files are one unit of work (one worker, one after another),
    every other file a unit of its own (module fixtures built once)."""
    from xdist.scheduler import LoadScopeScheduling

    class JobLane(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return JOB_LANE if path.rsplit("/", 1)[-1] in JOB_FILES else path
    return JobLane(config, log)


@pytest.fixture(scope="session", autouse=True)
def _job_logs():
    """Jobs write their full logs here (not into the checkout); removed at the end of the session.
    Made by the fixture, not at import: conftest may be imported more than once."""
    log_dir = tempfile.mkdtemp(prefix="coatnet-logs-")
    os.environ["COATNET_LOG_DIR"] = log_dir
    yield log_dir
    shutil.rmtree(log_dir, ignore_errors=True)


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
def demo_shards(tmp_path_factory) -> str:
    """The tiny demo dataset the end-to-end jobs train on: 256 train / 64 val images of 32 px,
    10 classes, 32 samples per shard (8 train shards: enough for 2 workers x 1 loader worker)."""
    from pipeline.data import write_demo_shards

    root = str(tmp_path_factory.mktemp("demo_shards") / "demo")
    write_demo_shards(root, num_train=256, num_val=64, image_size=32, samples_per_shard=32)
    return root


@pytest.fixture(scope="session")
def ray_cluster():
    """A Ray head for the session's end-to-end jobs (see ``helpers.RayHead``)."""
    head = RayHead(num_cpus=2)
    yield head
    head.stop()


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
