"""Ray side of a training stage: preflight checks, Ray start/attach, TorchTrainer with
ScalingConfig/RunConfig/FailureConfig/CheckpointConfig, ``fit``, then publishing the final weights
(storage to the MLflow run's artifacts, never through the driver's disk or memory).

    cfg = load_config(path, overrides)
    summary = run(cfg)            # -> RunSummary (checkpoint path, weights, MLflow run id, metrics)

Ray (``ray_session``, the one way every job starts and stops it): with ``RAY_ADDRESS`` set
(``ray job submit``) the driver attaches to that cluster; otherwise it starts a private local
instance (``address="local"``, own temp dir) - a plain ``ray.init()`` would attach to any cluster
recorded under /tmp/ray on a shared host.
A fine-tuning stage calls ``run(cfg, stage="finetune")`` with its own ``storage.name``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline import checkpoint, elastic, placement, tracking
from pipeline.cluster import ray_session, storage_filesystem, worker_env
from pipeline.config import Config, ConfigError, flat_params, is_remote, resolve_paths, resolved_dict
from pipeline.console import ProgressChannel, say
from pipeline.redact import redact
from pipeline.retry import RetryPolicy, call_with_retry
from pipeline.train import TrainTask
from pipeline.weights import EMA_WEIGHTS_DIR, WEIGHTS_DIR, copy_to_artifacts, copy_weights


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

def check_storage(path: str) -> None:
    """Write and delete a probe object; ConfigError naming storage.storage_path otherwise."""
    try:
        fs, p = storage_filesystem(path)
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
            say(f"note: {redact(url)} is not pre-shuffled (rows mixed within parts"
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
        import torch

        raise ConfigError(f"model.compile with train.bf16 on CPU workers: torch {torch.__version__.split('+')[0]}'s "
                          "inductor fails to build "
                          "bf16 CPU kernels (CppCompileError); set train.bf16=false or model.compile=false")
    s = cfg.scaling
    if s.min_workers:
        if s.min_workers > s.num_workers:
            raise ConfigError(f"scaling.min_workers ({s.min_workers}) exceeds scaling.num_workers ({s.num_workers})")
        counts = elastic.allowed_counts(cfg.train.global_batch, s.min_workers, s.num_workers)
        if counts == [s.num_workers] and s.min_workers < s.num_workers:
            raise ConfigError(f"scaling.min_workers: no count in {s.min_workers}..{s.num_workers - 1} divides "
                              f"train.global_batch {cfg.train.global_batch}; the run could never shrink")
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

def ray_cpus(cfg: Config) -> float:
    return cfg.scaling.num_workers * cfg.scaling.cpus_per_worker


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one training worker asks Ray for (as Ray Train's ScalingConfig adds it up)."""
    s = cfg.scaling
    res = {"CPU": s.cpus_per_worker, **({"GPU": 1.0} if s.use_gpu else {}), **s.resources_per_worker}
    if s.accelerator_type:
        res[f"accelerator_type:{s.accelerator_type}"] = 0.001
    return res


def make_trainer(cfg: Config, task: TrainTask):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train import train_loop_per_worker

    s = cfg.scaling
    fs, path = storage_filesystem(cfg.storage.storage_path)
    env = worker_env()
    env.setdefault("OMP_NUM_THREADS", str(s.torch_threads or max(1, int(s.cpus_per_worker))))
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    counts = elastic.allowed_counts(cfg.train.global_batch, s.min_workers or s.num_workers, s.num_workers)

    class Trainer(TorchTrainer):
        def _initialize_and_run_controller(self, **controller_init_kwargs):
            if self.scaling_config.elasticity_enabled:     # Ray's elastic policy, on batch-splitting counts
                controller_init_kwargs["scaling_policy"] = elastic.make_policy(
                    self.scaling_config, counts=counts, key=task.grow_key, settle_s=s.restart_settle_s, say=task.say)
            # a group that cannot be placed fails after scaling.placement_timeout_s (Ray retries forever)
            controller_init_kwargs["failure_policy"] = placement.make_failure_policy(
                self.run_config.failure_config, s.placement_timeout_s)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    if s.min_workers:
        task.grow_key = elastic.grow_key(f"{cfg.storage.storage_path.rstrip('/')}/{cfg.storage.name}")
    return Trainer(
        train_loop_per_worker,
        train_loop_config=task,
        # on GPU workers a CPU backend beside NCCL, so that no host-side collective (a library's,
        # a callback's) can fail with "no backend for device type cpu"; the loop's own run on the device
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=(counts[0], s.num_workers) if s.min_workers else s.num_workers,
                                     use_gpu=s.use_gpu, resources_per_worker=resources,
                                     accelerator_type=s.accelerator_type,
                                     elastic_resize_monitor_interval_s=s.resize_check_s),
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
        tracking.client(uri).set_tag(run_id, k, redact(str(v)))
    task.mlflow_run_id = run_id
    say(f"MLflow run     {run_id} ({'continued' if resumed else 'new'}) in {uri}")
    registered = checkpoint.registered_checkpoint(run_key)
    if registered:           # Ray resumes from it by itself
        say(f"resuming {cfg.storage.name} from {registered.rstrip('/').rsplit('/', 1)[-1]} "
            "(same storage path and name)")
    else:                    # folders without Ray's record of them: the workers are told which one
        task.resume_from = checkpoint.latest_complete(run_key)
        if task.resume_from:
            say(f"resuming {cfg.storage.name} from {task.resume_from.rstrip('/').rsplit('/', 1)[-1]} "
                "(no Ray snapshot: the newest complete checkpoint folder)")
    say(f"training       {cfg.model.variant} @ {cfg.model.img_size}px, {task.total_steps} steps of "
        f"{cfg.train.global_batch} on {cfg.scaling.num_workers} workers")
    with ray_session(ray_cpus(cfg)):
        progress = ProgressChannel()
        task.progress = progress
        progress.start()
        try:
            result = make_trainer(cfg, task).fit()
        except Exception as e:
            tracking.client(uri).set_terminated(run_id, status="FAILED")
            s = cfg.scaling        # workers that could not be placed: one line naming what is missing
            unplaced = placement.placement_failure(e, worker_resources(cfg), s.num_workers, s.placement_timeout_s)
            if unplaced is not None:
                raise unplaced from None
            raise
        finally:
            progress.stop()
    if result.error:
        tracking.client(uri).set_terminated(run_id, status="FAILED")
        raise result.error
    weights, ck_path, steps = None, None, 0
    if result.checkpoint is not None:
        ck_path = result.checkpoint.path
        if is_remote(cfg.storage.storage_path):
            ck_path = f"{cfg.storage.storage_path.split('://', 1)[0]}://{ck_path}"
        steps, weights = _publish_weights(cfg, result.checkpoint, run_id, ck_path)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    return RunSummary(cfg.storage.name, ck_path, weights, run_id, uri, cfg.tracking.experiment,
                      steps, metrics, resumed)


def _publish_weights(cfg: Config, final_checkpoint, run_id: str, ck_path: str) -> tuple[int, str | None]:
    """Log the final model to the MLflow run and finish it: the ``weights/`` (and, with an EMA,
    ``weights_ema/``) folders the workers exported into the final checkpoint are copied from storage
    straight into the run's artifact location (``weights.copy_to_artifacts``: storage to storage,
    or through the tracking server's proxy one shard at a time; never the model on the driver), and
    on local storage also beside the run. Returns (the checkpoint's step, where the weights are: a
    folder or runs:/ URI; None for a final checkpoint without exported weights)."""
    import pyarrow.fs as pafs

    uri = cfg.tracking.tracking_uri
    fs, root = final_checkpoint.filesystem, final_checkpoint.path.rstrip("/")
    with fs.open_input_stream(f"{root}/{checkpoint.STATE_FILE}") as f:
        state = checkpoint.TrainState.from_dict(json.loads(f.read()))
    found = [name for name in (WEIGHTS_DIR, EMA_WEIGHTS_DIR)
             if fs.get_file_info(f"{root}/{name}").type == pafs.FileType.Directory]
    if WEIGHTS_DIR not in found:
        # every final checkpoint the workers write holds weights/ (train.py exports at the last step);
        # one written before they did is not consolidated here (that needs the model on the driver)
        say(f"note: {ck_path.rstrip('/').rsplit('/', 1)[-1]} holds no exported weights (written before the "
            "workers exported them): none logged; fine-tune from the checkpoint folder instead")

    def publish() -> None:
        artifacts = tracking.client(uri).get_run(run_id).info.artifact_uri
        for name in found:
            copy_to_artifacts(f"{ck_path.rstrip('/')}/{name}", f"{artifacts.rstrip('/')}/{name}", tracking_uri=uri)
        tracking.finish_run(uri, run_id, resolved=resolved_dict(cfg),
                            tags={"coatnet.checkpoint": ck_path, "coatnet.status": "finished"})

    call_with_retry(publish, RetryPolicy(timeout_s=cfg.tracking.outage_timeout_s, initial_delay_s=1.0, max_delay_s=30.0),
                    retry_on=lambda e: True, announce=say, service="tracking server", doing="finishing the run")
    if WEIGHTS_DIR not in found:
        return state.step, None
    if is_remote(cfg.storage.storage_path):
        return state.step, f"runs:/{run_id}/{WEIGHTS_DIR}"
    run_dir = os.path.join(cfg.storage.storage_path, cfg.storage.name)
    for name in found:                 # storage to storage: the driver holds no copy
        shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
        copy_weights(f"{ck_path.rstrip('/')}/{name}", os.path.join(run_dir, name))
    return state.step, os.path.join(run_dir, WEIGHTS_DIR)
