"""Helpers the tests share: ports, a Ray head to attach jobs to, running and killing jobs, services
to take away under a job, hand-written shards, and what a job's terminal must look like.

Jobs run as a user runs them: ``python jobs/<job>.py`` in a subprocess, attached to a Ray cluster
through ``RAY_ADDRESS`` with token authentication on (``RayHead``, started once per test session
by the ``ray_cluster`` fixture), or with a private local Ray when no cluster is given.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, GLOBAL, MICRO = 8, 16, 8          # the tiny 2-worker run most end-to-end tests train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Processes we start: found by session, by the pid in a temp dir's name, or by our own temp dir
# ---------------------------------------------------------------------------------------------

def _session_pids(sid: int) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getsid(int(pid)) == sid:
                    out.append(int(pid))
            except (ProcessLookupError, PermissionError):
                pass
    return out


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process in the session of ``proc`` (started with start_new_session=True: the
    job's driver and, without a cluster, the private Ray it spawned) and remove that Ray's files."""
    try:
        sid = os.getsid(proc.pid)
    except ProcessLookupError:          # already gone (and reaped)
        proc.wait(timeout=60)
        return
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    remove_private_ray(proc.pid)


def remove_private_ray(driver_pid: int) -> None:
    """The private Ray temp dir of a driver that was killed before it could remove it."""
    from pipeline.cluster import PRIVATE_RAY_PREFIX

    for d in Path("/tmp").glob(f"{PRIVATE_RAY_PREFIX}{driver_pid}-*"):
        shutil.rmtree(d, ignore_errors=True)


def kill_processes_under(folder: str) -> None:
    """SIGKILL the processes whose command line names ``folder`` (a temp dir only we use)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if folder in cmd:
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


class RayHead:
    """A Ray head on loopback, as a user's cluster is: ``ray start --head`` with token
    authentication, a dashboard for ``ray job submit``, its own temp dir and ports (worker ports
    below the ephemeral range). Stopped by signalling what we started - never ``ray stop``, which
    stops every Ray on a shared host."""

    def __init__(self, num_cpus: int = 2) -> None:
        venv_bin = os.path.dirname(sys.executable)
        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")    # short: unix socket paths
        self.token = uuid.uuid4().hex + uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(PATH=f"{venv_bin}:{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   # a node that stops answering is declared dead after 3 s (Ray's default: about 15 s)
                   RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                   RAY_health_check_failure_threshold="3")
        self.gcs_port, dash = free_port(), free_port()
        ports = {"--port": self.gcs_port, "--dashboard-port": dash, "--node-manager-port": free_port(),
                 "--object-manager-port": free_port(), "--ray-client-server-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
        low = random.randrange(20000, 29900, 100)
        while any(low <= p <= low + 99 for p in ports.values()):
            low = random.randrange(20000, 29900, 100)
        ports.update({"--min-worker-port": low, "--max-worker-port": low + 99})
        cmd = [os.path.join(venv_bin, "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus),
               "--dashboard-host", "127.0.0.1", "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        for k, v in ports.items():
            cmd += [k, str(v)]
        self.log = os.path.join(self.temp_dir, "head.log")
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.dashboard = f"http://127.0.0.1:{dash}"
        # what a client of this cluster needs: the address and the token (never printed)
        self.env = {**env, "RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}"}
        try:
            self._wait_up()
        except BaseException:
            self.stop()
            raise

    def _wait_up(self, timeout: float = 180) -> None:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:      # answering (401 without a token): up
                return
            except OSError:
                if self.proc.poll() is not None or time.time() - t0 > timeout:
                    raise AssertionError("Ray head did not come up:\n" + open(self.log).read()[-3000:])
                time.sleep(0.5)

    def stop(self) -> None:
        """Every process of this head: its session, and those Ray started in sessions of their own
        (GCS, raylet, workers), which all name our temp dir on their command line."""
        kill_session(self.proc)
        kill_processes_under(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def add_node(self, num_cpus: int, resources: dict[str, float]) -> RayNode:
        """Another node of this cluster: its own raylet (``ray start --address``), ports and temp dir."""
        return RayNode(self, num_cpus, resources)


def _node_ports() -> dict[str, int]:
    ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    low = random.randrange(20000, 29900, 100)
    while any(low <= p <= low + 99 for p in ports.values()):
        low = random.randrange(20000, 29900, 100)
    return {**ports, "--min-worker-port": low, "--max-worker-port": low + 99}


class RayNode:
    """A worker node joined to a ``RayHead`` on this machine, as a cloud node joins a cluster; ``kill()``
    is the node dying (SIGKILL to its raylet and every worker on it, no goodbye)."""

    def __init__(self, head: RayHead, num_cpus: int, resources: dict[str, float]) -> None:
        venv_bin = os.path.dirname(sys.executable)
        self.temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
        env = {**head.env}
        env.pop("RAY_ADDRESS", None)
        cmd = [os.path.join(venv_bin, "ray"), "start", "--address", head.env["RAY_ADDRESS"], "--block",
               "--num-cpus", str(num_cpus), "--resources", json.dumps(resources), "--temp-dir", self.temp_dir,
               "--disable-usage-stats"]
        for k, v in _node_ports().items():
            cmd += [k, str(v)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(os.path.join(self.temp_dir, "node.log"), "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        kill_session(self.proc)
        kill_processes_under(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------

def job_cmd(*overrides: str, job: str = "pretrain") -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / f"{job}.py"), *overrides]


def job_env(cluster: RayHead | None = None, **extra: str) -> dict[str, str]:
    """The environment of a job: attached to ``cluster`` (RAY_ADDRESS and its token), or with no
    cluster a private local Ray; plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if cluster is not None:
        env.update(RAY_ADDRESS=cluster.env["RAY_ADDRESS"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token)
    env.update(extra)
    return env


def tiny_overrides(data_root: str, storage: str, name: str, uri: str, steps: int = STEPS) -> list[str]:
    """A 2-worker coatnet_pico run at 32 px: checkpoints every 2 steps, every step logged."""
    return [f"data.root={data_root}", "data.write_demo=false", "data.loader_workers=1",
            "data.augment.crop_scale=[0.8,1.0]",
            "model.variant=coatnet_pico", "model.img_size=32",
            f"train.steps={steps}", f"train.global_batch={GLOBAL}", f"train.micro_batch={MICRO}",
            "train.lr=0.003", "train.warmup_steps=1", "train.log_every=1",
            "train.eval_every=0", "train.checkpoint_every=2", "train.keep_last=2", "train.max_failures=2",
            "scaling.num_workers=2", f"storage.storage_path={storage}", f"storage.name={name}",
            f"tracking.tracking_uri={uri}", "tracking.experiment=test-pretrain",
            "tracking.system_metrics_interval_s=1"]


def callbacks(*probes: tuple[str, dict]) -> str:
    """``train.callbacks=[...]`` for a job's command line: (class name in tests/train_callbacks.py, kwargs)."""
    specs = [{"target": f"tests.train_callbacks:{name}", "kwargs": kwargs} for name, kwargs in probes]
    return "train.callbacks=" + json.dumps(specs)


def start_job(cmd: list[str], env: dict[str, str], cwd, log_path) -> subprocess.Popen:
    """A job in its own session (so that ``kill_session`` kills it and nothing else), output to a file."""
    return subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def run_job(cmd: list[str], env: dict[str, str], cwd, log_path, timeout: float = 600) -> str:
    """Run a job to its end; its output (AssertionError with the tail when it fails)."""
    proc = start_job(cmd, env, cwd, log_path)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        kill_session(proc)             # a no-op when it has finished
    out = Path(log_path).read_text()
    assert rc == 0, out[-5000:]
    return out


def wait_for(cond, proc: subprocess.Popen, timeout: float = 480, what: str = "") -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.5)


def ride_out(job: subprocess.Popen, log_path, stop, start, seconds: float):
    """Take a service away under a running job for ``seconds`` (``stop()``), bring it back
    (``start()``), wait for the job to finish: (its output, the restarted service). The job must
    still be running during the outage and end with exit code 0."""
    stop()
    time.sleep(seconds)
    assert job.poll() is None, open(log_path).read()[-3000:]
    service = start()
    rc = job.wait(timeout=420)
    out = open(log_path).read()
    assert rc == 0, out[-5000:]
    return out, service


def registered_step(run_dir: str) -> int:
    """The step of the latest checkpoint Ray has registered for a run on local storage (0: none)."""
    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):       # absent, or being rewritten
        return 0
    return int(latest.get("metrics", {}).get("step", 0))


def step_keys(keys_dir: str, rank: int) -> list[dict]:
    """The ``KeysLog`` probe's records of one rank: [{"step", "keys"}], in the order written."""
    p = Path(keys_dir) / f"keys.rank{rank}.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def mlflow_runs(uri: str, experiment: str = "test-pretrain"):
    """(client, runs of ``experiment``)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c, (c.search_runs([exp.experiment_id]) if exp else [])


def assert_console_is_readable(out: str, *, steps: int) -> None:
    """What the terminal of a training job shows: the log file first, then the MLflow run, one
    progress line per log step, the evaluation and the summary - each line once, no library chatter
    (it is in the log file)."""
    lines = [x for x in out.splitlines() if x.strip()]
    assert lines[0].startswith("log file"), lines[:3]
    log_path = lines[0].split(None, 2)[2]
    chatter = open(log_path).read()
    assert "RayTrainWorker" in chatter and "deepspeed" in chatter.lower()   # it went here...
    for noise in ("Warning", "warn(", "RayTrainWorker", "TrainController", "Failed to query", "Traceback",
                  "DeepSpeed", "[rank", "INFO"):
        assert noise not in out, (noise, out[-3000:])                     # ...not to the terminal
    assert len(lines) == len(set(lines)), [x for x in lines if lines.count(x) > 1]
    assert any(x.startswith("MLflow run") for x in lines)
    progress = [x for x in lines if x.startswith("step ")]
    assert progress and progress[-1].startswith(f"step {steps:>6}/{steps}") and "img/s" in progress[-1]
    assert any(x.startswith("eval  step") for x in lines) and "== pretraining finished ==" in lines


# ---------------------------------------------------------------------------------------------
# Services to take away under a job
# ---------------------------------------------------------------------------------------------

def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on loopback (SQLite store, proxied artifacts in ``folder``), set up as
    infra/mlflow sets it up: no GenAI job runner (a pool of idle worker processes otherwise)."""
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{folder}/store.db",
                             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=open(folder / f"server-{port}-{time.time():.0f}.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    stop_process_group(proc)
    raise AssertionError("mlflow server did not start")


def stop_process_group(proc: subprocess.Popen) -> None:
    """A server and its helper processes (one process group, ours)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def s3_env(endpoint: str) -> dict[str, str]:
    """A client's environment for a loopback S3 server (credentials the standard way)."""
    return {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}


class LocalWeightsWatch:
    """The ``.safetensors`` files this process opens while the watch is on (Python's ``open`` audit
    event: builtin open, os.open, fsspec's local files, boto3's up- and downloads; not C++ writers such
    as pyarrow's local filesystem): with the weights' source and destination in object storage, any
    entry means the weights were staged on this machine. ``opened``: (path, mode or flags)."""

    _active: list["LocalWeightsWatch"] = []
    _hooked = False

    def __enter__(self) -> "LocalWeightsWatch":
        if not LocalWeightsWatch._hooked:          # an audit hook stays for the process: it checks a list
            sys.addaudithook(LocalWeightsWatch._hook)
            LocalWeightsWatch._hooked = True
        self.opened: list[tuple[str, object]] = []
        LocalWeightsWatch._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        LocalWeightsWatch._active.remove(self)

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        if event == "open" and LocalWeightsWatch._active and isinstance(args[0], (str, os.PathLike)) \
                and os.fspath(args[0]).endswith(".safetensors"):
            for watch in LocalWeightsWatch._active:
                watch.opened.append((os.fspath(args[0]), args[1] if args[1] is not None else args[2]))


# ---------------------------------------------------------------------------------------------
# Hand-written shards (anything a tar can hold, for the bad-data tests)
# ---------------------------------------------------------------------------------------------

def jpeg(shade: int, size: int = 12) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (shade, shade, shade)).save(buf, format="JPEG")
    return buf.getvalue()


def write_index(root: Path, shards: list[list[tuple[str, dict[str, bytes]]]], class_names=("a", "b", "c")):
    """Shards written member by member (so they can hold anything) and their ShardIndex."""
    from pipeline.data import ShardIndex, ShardInfo

    infos = []
    for i, samples in enumerate(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for key, files in samples:
                for ext, payload in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        data = buf.getvalue()
        name = f"shard-{i:06d}.tar"
        (root / name).write_bytes(data)
        infos.append(ShardInfo(name, len(samples), hashlib.sha256(data).hexdigest(), len(data)))
    index = ShardIndex(root=str(root), shards=tuple(infos), class_names=tuple(class_names))
    index.save()
    return index


def train_tiny(shards: Path, steps: int, seed: int, *, variant: str = "coatnet_pico", img_size: int = 32,
               one_cycle_max_lr: float | None = None):
    """A tiny CoAtNet trained in plain PyTorch (AdamW, lr 3e-3; with ``one_cycle_max_lr`` a one-cycle
    schedule) on the demo train split under ``shards``, one thread; returns (model in eval mode, spec)."""
    import torch
    import torch.nn.functional as F

    import models
    from pipeline.data import AugmentConfig, ShardIndex, StreamingLoader
    from pipeline.spec import ModelSpec

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # 2 shared cores: one thread is faster than two fighting
    idx = ShardIndex.load(str(Path(shards) / "train"))
    model = models.create_model(variant, num_classes=idx.num_classes, img_size=img_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=one_cycle_max_lr, total_steps=max(2, steps),
                                                 pct_start=0.15) if one_cycle_max_lr and steps > 1 else None)
    augment = AugmentConfig(randaug_n=0, mixup_alpha=0.0, label_smoothing=0.0, crop_scale=(0.6, 1.0))
    loader = StreamingLoader(idx, rank=0, world_size=1, batch_size=32, img_size=img_size, train=True,
                             seed=seed, num_workers=0, augment=augment)
    step, epoch = 0, 0
    model.train()
    while step < steps:
        loader.set_epoch(epoch)
        for batch in loader:
            loss = F.cross_entropy(model(batch.images), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    torch.set_num_threads(threads)
    return model.eval(), ModelSpec.for_data(model, variant, idx, augment)
