"""Ray side of a training stage: preflight checks, Ray init/attach, TorchTrainer with
ScalingConfig/RunConfig/FailureConfig/CheckpointConfig, ``fit``, then consolidation and MLflow.

    cfg = load_config(path, overrides)
    summary = run(cfg)            # -> RunSummary (checkpoint path, weights, MLflow run id, metrics)

Ray: with ``RAY_ADDRESS`` set (``ray job submit``) the driver attaches to that cluster; otherwise
it starts a private local instance (``address="local"``, own temp dir) - a plain ``ray.init()``
would attach to any cluster recorded under /tmp/ray on a shared host.
A fine-tuning stage calls ``run(cfg, stage="finetune")`` with its own ``storage.name``.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline import checkpoint as ckpt
from pipeline import tracking
from pipeline.config import Config, ConfigError, flat_params, is_url, resolve_paths, resolved_dict

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

    def render(self) -> str:
        lines = [f"run            {self.name}  ({'resumed' if self.resumed else 'new'})",
                 f"steps          {self.steps}"]
        lines += [f"{k:<14} {v:.4f}" for k, v in self.metrics.items()
                  if k.startswith("eval/") and isinstance(v, float)]
        lines += [f"checkpoint     {self.checkpoint}",
                  f"fp32 weights   {self.weights}",
                  f"MLflow run     {self.mlflow_run_id}  (experiment '{self.experiment}', {self.tracking_uri})",
                  f"MLflow UI      {tracking.ui_hint(self.tracking_uri)}"]
        return "\n".join(lines)


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
            fs, p = pafs.FileSystem.from_uri(path if is_url(path) else os.path.abspath(path))
        fs.create_dir(p, recursive=True)
        probe = f"{p.rstrip('/')}/.probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:   # noqa: BLE001 - any failure means unusable storage
        raise ConfigError(f"storage.storage_path {path} is not writable: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}") from None


def prepare(cfg: Config) -> tuple[Config, dict[str, Any]]:
    """Validate against the world (variant, data, storage), resolve derived numbers.
    Returns (resolved config, plan for the workers without the MLflow run id)."""
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
        index = ShardIndex.load(cfg.data.train_url)
        val = ShardIndex.load(cfg.data.val_url) if cfg.data.val_url else None
    except (DataError, OSError, ValueError) as e:
        raise ConfigError(f"data.root: cannot read the shard index: {e}") from None
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
    check_storage(cfg.storage.storage_path)
    t = cfg.train
    per_epoch = (cfg.data.samples_per_epoch or index.num_samples) / t.global_batch
    total = t.steps if t.steps is not None else max(1, math.ceil(t.epochs * per_epoch))
    if t.warmup_steps is not None:
        warmup = t.warmup_steps
    elif t.warmup_epochs is not None:
        warmup = int(t.warmup_epochs * per_epoch)
    else:
        warmup = 0
    plan = {"config": cfg.model_dump(mode="json"), "total_steps": total,
            "warmup_steps": min(warmup, total), "train_samples": index.num_samples,
            "label_type": index.label_type}
    return cfg, plan


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------

def init_ray(cfg: Config) -> str | None:
    """Attach (RAY_ADDRESS set) or start a private local Ray. Returns the temp dir to remove."""
    import ray

    if ray.is_initialized():
        return None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return None
    tmp = tempfile.mkdtemp(prefix="rp", dir="/tmp")   # short: unix socket paths < 107 chars
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    ray.init(address="local", num_cpus=max(int(math.ceil(need)), os.cpu_count() or 1),
             _temp_dir=tmp, include_dashboard=False, log_to_driver=True, configure_logging=False)
    return tmp


def make_trainer(cfg: Config, plan: dict[str, Any]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train import train_loop_per_worker

    s = cfg.scaling
    fs, path = storage_filesystem(cfg.storage.storage_path)
    env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
    # workers import this checkout's packages whatever their working directory
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (repo, os.environ.get("PYTHONPATH")) if x)
    env.setdefault("OMP_NUM_THREADS", str(s.torch_threads or max(1, int(s.cpus_per_worker))))
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.storage.name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
            worker_runtime_env={"env_vars": env}),
    )


def latest_checkpoint(cfg: Config) -> str | None:
    """The checkpoint Ray Train will resume this run name from (read from Ray's snapshot file), if any."""
    import json

    import pyarrow.fs as pafs

    try:
        fs, path = storage_filesystem(cfg.storage.storage_path)
        if fs is None:
            fs, path = pafs.FileSystem.from_uri(cfg.storage.storage_path if is_url(cfg.storage.storage_path)
                                                else os.path.abspath(cfg.storage.storage_path))
        with fs.open_input_stream(f"{path.rstrip('/')}/{cfg.storage.name}/checkpoint_manager_snapshot.json") as f:
            latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
        return latest.get("checkpoint_dir_name")
    except Exception:   # noqa: BLE001 - no snapshot (new run) or an unknown format: nothing to say
        return None


def run(cfg: Config, *, stage: str = "pretrain", extra_tags: dict[str, str] | None = None) -> RunSummary:
    """``extra_tags``: more MLflow run tags (lineage, mlflow.parentRunId), also set on a continued run."""
    cfg, plan = prepare(cfg)
    run_key = f"{cfg.storage.storage_path.rstrip('/')}/{cfg.storage.name}"
    tags = {"coatnet.stage": stage, "coatnet.variant": cfg.model.variant,
            "coatnet.img_size": str(cfg.model.img_size), "coatnet.num_classes": str(cfg.model.num_classes),
            "coatnet.label_type": plan["label_type"], "coatnet.storage": run_key}
    sha = tracking.git_sha()
    if sha:
        tags["mlflow.source.git.commit"] = sha
    uri = cfg.tracking.tracking_uri
    tags.update(extra_tags or {})
    run_id, resumed = tracking.get_or_create_run(uri, cfg.tracking.experiment, run_key,
                                                 cfg.tracking.run_name, tags, flat_params(cfg))
    for k, v in (extra_tags or {}).items() if resumed else ():
        tracking.client(uri).set_tag(run_id, k, v)
    plan["mlflow_run_id"] = run_id
    print(f"MLflow run {run_id} ({'continued' if resumed else 'new'}) in {uri}", flush=True)
    previous = latest_checkpoint(cfg)
    if previous:
        print(f"resuming {cfg.storage.name} from {previous} (same storage path and name)", flush=True)
    tmp = init_ray(cfg)
    try:
        result = make_trainer(cfg, plan).fit()
    except Exception:
        tracking.client(uri).set_terminated(run_id, status="FAILED")
        raise
    finally:
        if tmp:
            import ray

            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
    if result.error:
        tracking.client(uri).set_terminated(run_id, status="FAILED")
        raise result.error
    # consolidate the final ZeRO-3 checkpoint to one fp32 state dict, log it
    weights, ck_path = None, None
    if result.checkpoint is not None:
        ck_path = result.checkpoint.path if not cfg.storage.storage_path.startswith("s3://") \
            else f"s3://{result.checkpoint.path}"
        with result.checkpoint.as_directory() as d:
            state = ckpt.read_state(d)
            sd = ckpt.consolidate(d)
        out_dir = tempfile.mkdtemp(prefix="weights-")
        weights = ckpt.save_weights(sd, os.path.join(out_dir, ckpt.WEIGHTS_FILE))
        if not is_url(cfg.storage.storage_path):
            keep = os.path.join(cfg.storage.storage_path, cfg.storage.name, ckpt.WEIGHTS_FILE)
            shutil.copyfile(weights, keep)
        tracking.finish_run(uri, run_id, weights_path=weights, resolved=resolved_dict(cfg),
                            tags={"coatnet.checkpoint": ck_path, "coatnet.status": "finished"})
        if not is_url(cfg.storage.storage_path):
            shutil.rmtree(out_dir, ignore_errors=True)
            weights = keep
        steps = state["step"]
    else:
        steps = 0
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    return RunSummary(cfg.storage.name, ck_path, weights, run_id, uri, cfg.tracking.experiment,
                      steps, metrics, resumed)
