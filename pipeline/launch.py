"""Ray side of a training stage: preflight checks, Ray start/attach, TorchTrainer with
ScalingConfig/RunConfig/FailureConfig/CheckpointConfig, ``fit``, then consolidation and MLflow.

    cfg = load_config(path, overrides)
    summary = run(cfg)            # -> RunSummary (checkpoint path, weights, MLflow run id, metrics)

Ray (``ray_session``, the one way every job starts and stops it): with ``RAY_ADDRESS`` set
(``ray job submit``) the driver attaches to that cluster; otherwise it starts a private local
instance (``address="local"``, own temp dir) - a plain ``ray.init()`` would attach to any cluster
recorded under /tmp/ray on a shared host.
A fine-tuning stage calls ``run(cfg, stage="finetune")`` with its own ``storage.name``.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline import checkpoint
from pipeline import tracking
from pipeline.config import (Config, ConfigError, flat_params, is_remote, resolve_paths, resolved_dict,
                             scrub_text)
from pipeline.console import ProgressChannel, say
from pipeline.train import TrainTask

# environment a worker needs from the driver (values are never logged)
_PASS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
             "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL",
             "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
             "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "GOOGLE_APPLICATION_CREDENTIALS")


@dataclass
class RunSummary:
    name: str
    checkpoint: str | None
    weights: str | None
    mlflow_run_id: str
    tracking_uri: str
    experiment: str
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False

    def lines(self) -> list[str]:
        lines = [f"run            {self.name}  ({'resumed' if self.resumed else 'new'})",
                 f"steps          {self.steps}"]
        lines += [f"{k:<14} {v:.4f}" for k, v in self.metrics.items()
                  if k.startswith("eval/") and isinstance(v, float)]
        lines += [f"checkpoint     {self.checkpoint}",
                  f"fp32 weights   {self.weights}",
                  f"MLflow run     {self.mlflow_run_id}  (experiment '{self.experiment}', {self.tracking_uri})",
                  f"MLflow UI      {tracking.ui_hint(self.tracking_uri)}"]
        return lines


# ---------------------------------------------------------------------------------------------
# Preflight: everything that can be checked before a worker starts
# ---------------------------------------------------------------------------------------------

def storage_filesystem(path: str):
    """(pyarrow filesystem or None, path for Ray). S3 with a custom endpoint (AWS_ENDPOINT_URL,
    e.g. MinIO or a loopback test server) needs an explicit pyarrow filesystem."""
    if path.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        from urllib.parse import urlparse

        import pyarrow.fs as pafs

        ep = urlparse(os.environ["AWS_ENDPOINT_URL"])
        fs = pafs.S3FileSystem(endpoint_override=ep.netloc, scheme=ep.scheme or "https",
                               region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        return fs, path[len("s3://"):]
    return None, path


def check_storage(path: str) -> None:
    """Write and delete a probe object; ConfigError naming storage.storage_path otherwise."""
    import pyarrow.fs as pafs

    try:
        fs, p = storage_filesystem(path)
        if fs is None:
            fs, p = pafs.FileSystem.from_uri(path if is_remote(path) else os.path.abspath(path))
        fs.create_dir(p, recursive=True)
        probe = f"{p.rstrip('/')}/.probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:   # noqa: BLE001 - any failure means unusable storage
        raise ConfigError(f"storage.storage_path {path} is not writable: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}") from None


def prepare(cfg: Config) -> tuple[Config, TrainTask]:
    """Validate against the world (variant, data, storage), resolve derived numbers.
    Returns (resolved config, the workers' task without the MLflow run id)."""
    import models

    from pipeline.data import DataError, ShardIndex, write_demo_shards

    cfg = resolve_paths(cfg)
    if cfg.model.variant not in models.list_models():
        raise ConfigError(f"model.variant: unknown variant {cfg.model.variant!r}; "
                          f"known: {', '.join(models.list_models())}")
    if cfg.data.write_demo:
        write_demo_shards(cfg.data.root, num_train=cfg.data.demo_num_train, num_val=cfg.data.demo_num_val,
                          image_size=cfg.data.demo_image_size, samples_per_shard=250)
    try:
        index = ShardIndex.load(cfg.data.train_url) if not cfg.data.sources else None
        val = ShardIndex.load(cfg.data.val_url) if cfg.data.val_url else None
    except (DataError, OSError, ValueError) as e:
        raise ConfigError(f"data.root: cannot read the shard index: {e}") from None
    train_samples = index.num_samples if index is not None else 0
    trained_on = [(cfg.data.train_url, index)] if index is not None else []
    for i, (name, url, _) in enumerate(cfg.data.train_sources()):
        try:
            src = ShardIndex.load(url)
        except (DataError, OSError, ValueError) as e:
            raise ConfigError(f"data.sources.{i} ({name}): cannot read the shard index: {e}") from None
        if index is not None and (src.label_type, list(src.class_names)) != (index.label_type, list(index.class_names)):
            raise ConfigError(f"data.sources.{i} ({name}): another label space than the first source "
                              f"({src.num_classes} {src.label_type}-label classes vs {index.num_classes})")
        index = index or src
        trained_on.append((url, src))
        train_samples += src.num_samples
    for url, idx in trained_on:
        if not idx.pre_shuffled:
            part = idx.meta.get("samples_per_shard", 0) * idx.meta.get("shards_per_part", 0)
            say(f"note: {scrub_text(url)} is not pre-shuffled (rows mixed within parts"
                f"{f' of {part}' if part else ''} only); the loader mixes shards and a sample buffer "
                f"per worker - shuffle a class-sorted manifest before make_shards")
    if cfg.model.num_classes is None:
        cfg.model.num_classes = index.num_classes
    elif cfg.model.num_classes != index.num_classes and not cfg.init.from_checkpoint:
        raise ConfigError(f"model.num_classes ({cfg.model.num_classes}) differs from the data "
                          f"({index.num_classes} classes in {cfg.data.train_url})")
    if cfg.train.loss == "softmax" and index.label_type == "multi":
        raise ConfigError("train.loss: softmax with multi-label data; use train.loss=sigmoid")
    w = cfg.scaling.num_workers
    if val is not None and val.num_samples < w:
        raise ConfigError(f"data.val_split: {val.num_samples} samples for {w} workers")
    if cfg.model.compile and cfg.train.bf16 and not cfg.scaling.use_gpu:
        raise ConfigError("model.compile with train.bf16 on CPU workers: torch 2.13's inductor fails to build "
                          "bf16 CPU kernels (CppCompileError); set train.bf16=false or model.compile=false")
    s = cfg.scaling
    if s.min_workers:
        t = cfg.train
        bad = [w for w in range(s.min_workers, s.num_workers + 1) if t.global_batch % (w * t.micro_batch)]
        if s.min_workers > s.num_workers or bad:
            raise ConfigError(f"scaling.min_workers..num_workers = {s.min_workers}..{s.num_workers}: "
                              + (f"train.global_batch {t.global_batch} is not a multiple of train.micro_batch "
                                 f"{t.micro_batch} x {bad[0]} workers" if bad else "min exceeds max"))
    check_storage(cfg.storage.storage_path)
    t = cfg.train
    per_epoch = (cfg.data.samples_per_epoch or train_samples) / t.global_batch   # a mixture: all sources once
    total = t.steps if t.steps is not None else max(1, math.ceil(t.epochs * per_epoch))
    if t.warmup_steps is not None:
        warmup = t.warmup_steps
    elif t.warmup_epochs is not None:
        warmup = int(t.warmup_epochs * per_epoch)
    else:
        warmup = 0
    task = TrainTask(config=cfg.model_dump(mode="json"), total_steps=total, warmup_steps=min(warmup, total),
                     train_samples=train_samples, label_type=index.label_type)
    return cfg, task


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------

@contextmanager
def ray_session(num_cpus: float | None = None) -> Iterator[None]:
    """Ray for the duration: nothing to do when this process already has it; attach to the cluster
    when RAY_ADDRESS is set (``ray job submit``, token auth from the environment); otherwise a
    private local instance with its own temp dir, shut down and removed on exit. Worker output is
    forwarded to this process's stdout, which a job's console sends to its log file."""
    import ray

    if ray.is_initialized():
        yield
        return
    tmp = None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, configure_logging=False)
    else:
        # short (unix socket paths < 107 chars), and named by this pid so that whoever SIGKILLs a
        # driver (which then cannot clean up) can find and remove its Ray's files
        tmp = tempfile.mkdtemp(prefix=f"rp{os.getpid()}-", dir="/tmp")
        ray.init(address="local", num_cpus=max(int(math.ceil(num_cpus or 0)), os.cpu_count() or 1),
                 _temp_dir=tmp, include_dashboard=False, log_to_driver=True, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def worker_env() -> dict[str, str]:
    """The environment a Ray worker of this job needs from the driver: credentials and endpoints
    (``_PASS_ENV``; passed, never logged) and this checkout on ``PYTHONPATH``, so that workers
    import its packages whatever their working directory."""
    env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (repo, os.environ.get("PYTHONPATH")) if x)
    return env


def ray_cpus(cfg: Config) -> float:
    return cfg.scaling.num_workers * cfg.scaling.cpus_per_worker


def make_trainer(cfg: Config, task: TrainTask):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train import train_loop_per_worker

    s = cfg.scaling
    fs, path = storage_filesystem(cfg.storage.storage_path)
    env = worker_env()
    env.setdefault("OMP_NUM_THREADS", str(s.torch_threads or max(1, int(s.cpus_per_worker))))
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=task,
        scaling_config=ScalingConfig(num_workers=(s.min_workers, s.num_workers) if s.min_workers else s.num_workers,
                                     use_gpu=s.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.storage.name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
            worker_runtime_env={"env_vars": env}),
    )


def run(cfg: Config, *, stage: str = "pretrain", extra_tags: dict[str, str] | None = None) -> RunSummary:
    """``extra_tags``: more MLflow run tags (lineage, mlflow.parentRunId), also set on a continued run."""
    cfg, task = prepare(cfg)
    run_key = f"{cfg.storage.storage_path.rstrip('/')}/{cfg.storage.name}"
    tags = {"coatnet.stage": stage, "coatnet.variant": cfg.model.variant,
            "coatnet.img_size": str(cfg.model.img_size), "coatnet.num_classes": str(cfg.model.num_classes),
            "coatnet.label_type": task.label_type, "coatnet.storage": run_key}
    sha = tracking.git_sha()
    if sha:
        tags["mlflow.source.git.commit"] = sha
    uri = cfg.tracking.tracking_uri
    tags.update(extra_tags or {})
    run_id, resumed = tracking.get_or_create_run(uri, cfg.tracking.experiment, run_key,
                                                 cfg.tracking.run_name, tags, flat_params(cfg))
    for k, v in (extra_tags or {}).items() if resumed else ():
        tracking.client(uri).set_tag(run_id, k, scrub_text(str(v)))
    task.mlflow_run_id = run_id
    say(f"MLflow run     {run_id} ({'continued' if resumed else 'new'}) in {uri}")
    previous = checkpoint.latest_checkpoint(run_key)
    if previous:
        say(f"resuming {cfg.storage.name} from {previous.rstrip('/').rsplit('/', 1)[-1]} "
            "(same storage path and name)")
    say(f"training       {cfg.model.variant} @ {cfg.model.img_size}px, {task.total_steps} steps of "
        f"{cfg.train.global_batch} on {cfg.scaling.num_workers} workers")
    with ray_session(ray_cpus(cfg)):
        progress = ProgressChannel()
        task.progress = progress
        progress.start()
        try:
            result = make_trainer(cfg, task).fit()
        except Exception:
            tracking.client(uri).set_terminated(run_id, status="FAILED")
            raise
        finally:
            progress.stop()
    if result.error:
        tracking.client(uri).set_terminated(run_id, status="FAILED")
        raise result.error
    # stream the final ZeRO-3 checkpoint into fp32 safetensors shards; keep them with the run, log them
    weights, ck_path, steps = None, None, 0
    if result.checkpoint is not None:
        ck_path = result.checkpoint.path if not cfg.storage.storage_path.startswith("s3://") \
            else f"s3://{result.checkpoint.path}"
        out_dir = tempfile.mkdtemp(prefix="weights-")
        with result.checkpoint.as_directory() as d:
            state = checkpoint.read_state(d)
            local = checkpoint.consolidate_to(d, os.path.join(out_dir, checkpoint.WEIGHTS_DIR))
            ema = os.path.join(d, checkpoint.EMA_WEIGHTS_DIR)
            if os.path.isdir(ema):                       # written by the workers with train.ema_decay
                shutil.copytree(ema, os.path.join(out_dir, checkpoint.EMA_WEIGHTS_DIR))
        logged = {name: os.path.join(out_dir, name) for name in (checkpoint.WEIGHTS_DIR, checkpoint.EMA_WEIGHTS_DIR)
                  if os.path.isdir(os.path.join(out_dir, name))}
        tracking.with_retries(
            lambda: tracking.finish_run(uri, run_id, weights_dirs=logged, resolved=resolved_dict(cfg),
                                        tags={"coatnet.checkpoint": ck_path, "coatnet.status": "finished"}),
            timeout_s=cfg.tracking.outage_timeout_s, what="finishing the run", say=say)
        if is_remote(cfg.storage.storage_path):
            weights = f"runs:/{run_id}/{checkpoint.WEIGHTS_DIR}"
        else:
            run_dir = os.path.join(cfg.storage.storage_path, cfg.storage.name)
            for name, folder in logged.items():
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
                shutil.copytree(folder, os.path.join(run_dir, name))
            weights = os.path.join(run_dir, checkpoint.WEIGHTS_DIR)
        shutil.rmtree(out_dir, ignore_errors=True)
        steps = state.step
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    return RunSummary(cfg.storage.name, ck_path, weights, run_id, uri, cfg.tracking.experiment,
                      steps, metrics, resumed)
