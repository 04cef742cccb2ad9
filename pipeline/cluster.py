"""Ray and the run's storage as every stage reaches them, below everything that uses them:

- ``ray_session``: the one way a job starts or attaches to Ray, and stops what it started;
- ``worker_env``: what a Ray worker of this job needs from the driver's environment;
- ``storage_filesystem``: the pyarrow filesystem Ray Train writes checkpoints through.

With ``RAY_ADDRESS`` set (``ray job submit``, or a driver on a cluster's node) the driver attaches
to that cluster, with token authentication from the environment (``RAY_AUTH_TOKEN`` or
``~/.ray/auth_token``); otherwise it starts a private local instance (``address="local"``, its
own temp dir) - a plain ``ray.init()`` would attach to any cluster recorded under /tmp/ray on a
shared host.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

# environment a worker needs from the driver (values are passed, never logged)
PASSED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
              "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL",
              "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
              "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "GOOGLE_APPLICATION_CREDENTIALS")
PRIVATE_RAY_PREFIX = "rp"      # /tmp/rp<driver pid>-*: a private instance's temp dir


@contextmanager
def ray_session(num_cpus: float | None = None) -> Iterator[None]:
    """Ray for the duration: nothing to do when this process already has it; attach to the cluster
    at RAY_ADDRESS; otherwise a private local instance with at least ``num_cpus`` CPUs and its own
    temp dir, shut down and removed on exit. Worker output is forwarded to this process's stdout,
    which a job's console sends to its log file."""
    import ray

    if ray.is_initialized():
        yield
        return
    tmp = None
    # every process of the job (Ray Train's controller too, which opens the run's storage) gets
    # what the driver was given; on a cluster its other processes do not share the driver's env
    job_env = {"env_vars": worker_env()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=job_env, log_to_driver=True, configure_logging=False)
    else:
        # short (unix socket paths < 107 chars), and named by this pid so that whoever SIGKILLs a
        # driver (which then cannot clean up) can find and remove its Ray's files
        tmp = tempfile.mkdtemp(prefix=f"{PRIVATE_RAY_PREFIX}{os.getpid()}-", dir="/tmp")
        ray.init(address="local", num_cpus=max(int(math.ceil(num_cpus or 0)), os.cpu_count() or 1),
                 runtime_env=job_env, _temp_dir=tmp, include_dashboard=False, log_to_driver=True,
                 configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def worker_env() -> dict[str, str]:
    """The environment a Ray worker of this job needs from the driver: credentials and endpoints
    (``PASSED_ENV``; passed, never logged) and this checkout on ``PYTHONPATH``, so that workers
    import its packages whatever their working directory."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (repo, os.environ.get("PYTHONPATH")) if x)
    return env


def storage_filesystem(path: str):
    """(pyarrow filesystem, path on it) for a run's storage path (local folder or URL). S3 with a
    custom endpoint (``AWS_ENDPOINT_URL``: MinIO, a loopback test server) needs an explicit pyarrow
    S3 filesystem: pyarrow ignores that variable."""
    import pyarrow.fs as pafs

    if path.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        from urllib.parse import urlparse

        endpoint = urlparse(os.environ["AWS_ENDPOINT_URL"])
        fs = pafs.S3FileSystem(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https",
                               region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        return fs, path[len("s3://"):]
    return pafs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))
