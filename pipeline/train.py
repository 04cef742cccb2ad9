"""The per-worker training loop (runs inside each Ray Train worker), top to bottom:

    setup -> data -> engine -> resume -> [step, log, eval, checkpoint]* -> end

``train_loop_per_worker(task)`` is what ``pipeline.launch`` hands to ``TorchTrainer``; ``task`` is
the ``TrainTask`` the driver built (``launch.prepare``). A fine-tuning stage reuses it as-is with
``init.from_checkpoint`` set (``pipeline.engine.load_init_weights`` streams the source into each
rank's partitions, tables resized, a new head left as initialised; skipped when resuming).
Extra behaviour (profilers, the tests' probes) comes in as ``Callback`` objects named by
``train.callbacks``; the loop itself has no test-only knobs.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from pipeline import checkpoint, tracking
from pipeline.checkpoint import TrainState
from pipeline.config import CallbackSpec, Config
from pipeline.elastic import GrowRequests
from pipeline.engine import (build_engine, compute_dtype, deepspeed_config, export_weights, load_init_weights,
                             master_partitions, swapped_in)
from pipeline.evaluate import Scores
from pipeline.redact import redact, redact_values
from pipeline.tracking import MetricsLogger, SystemMetrics
from pipeline.weights import EMA_WEIGHTS_DIR, WEIGHTS_DIR


@dataclass
class TrainTask:
    """Driver -> workers: the resolved config and the numbers derived from it on the driver."""

    config: dict[str, Any]             # Config.model_dump(mode="json"), paths absolute
    total_steps: int
    warmup_steps: int
    train_samples: int
    label_type: str
    mlflow_run_id: str | None = None
    progress: Any = None               # pipeline.console.ProgressChannel, None: print
    resume_from: str | None = None     # a checkpoint folder (URL) when Ray has none registered to resume from
    grow_key: str | None = None        # elastic runs: where the controller asks for a checkpoint before growing

    def cfg(self) -> Config:
        return Config.model_validate(self.config)

    def say(self, line: str) -> None:
        line = redact(line)
        if self.progress is not None:
            self.progress.send(line)
        print(line, flush=True)        # the worker's own log keeps it too


class Callback:
    """Hooks into the loop. Subclass and name it in ``train.callbacks`` (``module:Class`` plus
    kwargs); every worker builds its own instance. All methods are optional no-ops."""

    def on_start(self, *, rank: int, world_size: int) -> None: ...

    def on_train_start(self, engine, *, step: int, rank: int, ema: list[torch.Tensor] | None = None) -> None:
        """Engine built and checkpoint (if any) loaded; ``step`` optimizer steps are behind; ``ema``:
        this rank's EMA partitions (with ``train.ema_decay``)."""

    def on_step(self, step: int, keys: list[str]) -> None:
        """After optimizer step ``step`` (1-based), with the keys of the samples this rank used."""

    def on_save(self, step: int, folder: str) -> None:
        """This rank's part of checkpoint ``step`` is written in the local ``folder`` and not yet
        uploaded: files added here travel with it. The checkpoint counts only after every rank's
        upload (a rank that dies here leaves the previous checkpoint the one resumed from)."""

    def on_end(self, engine, *, rank: int) -> None:
        """After the last step, before the worker exits (collective calls allowed: every rank runs it)."""


class TrainingStopped(RuntimeError):
    """Raised by every rank after the checkpoint a SIGTERM asked for: Ray Train then restarts the
    group from that checkpoint, where resources are (``train.max_failures``; -1: always)."""


class TerminationNotice:
    """SIGTERM for this worker process (a spot instance reclaimed, a node shut down): recorded, so
    that the loop can finish its step, checkpoint with every other rank and stop, instead of the
    process ending mid-step and the run losing every step since its last checkpoint.

    A Ray worker's own SIGTERM handler exits the process at once (SystemExit from the main thread),
    and the train function runs in another thread, where Python does not let it install a handler.
    The handler calls ``ray._private.worker.raise_sys_exit_with_custom_error_message``; that name is
    wrapped: a first SIGTERM is recorded, any other exit (and a second SIGTERM) goes through as before.
    Where it is missing (another Ray), SIGTERM ends the process as it always did."""

    def __init__(self) -> None:
        self.received = 0

    def install(self) -> "TerminationNotice":
        try:
            import ray._private.worker as ray_worker

            original = ray_worker.raise_sys_exit_with_custom_error_message
        except (ImportError, AttributeError):
            return self

        def exit_unless_first_sigterm(message, exit_code=0):
            if "SIGTERM" in str(message) and not self.received:
                self.received = 1
                print("SIGTERM: finishing the step, then checkpointing with every rank", flush=True)
                return
            original(message, exit_code)
        ray_worker.raise_sys_exit_with_custom_error_message = exit_unless_first_sigterm
        return self


def build_callbacks(specs: list[CallbackSpec]) -> list[Callback]:
    out = []
    for s in specs:
        module, _, attr = s.target.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        out.append(obj(**s.kwargs))
    return out


# ---------------------------------------------------------------------------------------------
# Pieces (each usable alone)
# ---------------------------------------------------------------------------------------------

def fit_batch_to_world(cfg: Config, world: int) -> Config:
    """``cfg`` for ``world`` workers with the same global batch: gradient accumulation absorbs the
    change, and the micro-batch shrinks to the largest divisor of the per-rank batch not above the
    configured one when it must (an elastic group that shrank or grew; the data cursor carries a
    micro-batch change). PipelineError when ``world`` does not divide the global batch."""
    from pipeline.errors import PipelineError

    t = cfg.train
    if t.micro_batch * t.grad_accum * world == t.global_batch:
        return cfg
    per_rank, rest = divmod(t.global_batch, world)
    if rest or per_rank == 0:
        raise PipelineError(
            f"train.global_batch {t.global_batch} cannot be split evenly over {world} workers: "
            f"run on a count that divides it (scaling.min_workers lets Ray choose one)")
    micro = max(m for m in range(1, min(t.micro_batch, per_rank) + 1) if per_rank % m == 0)
    data = cfg.model_dump(mode="json")
    data["train"]["micro_batch"] = micro
    data["train"]["grad_accum"] = per_rank // micro
    data["scaling"]["num_workers"] = world
    return Config.model_validate(data)


def resume_point(task: TrainTask, cfg: Config):
    """The checkpoint the driver found for a run Ray has no record of (folders copied from
    elsewhere, a lost snapshot): a ``ray.train.Checkpoint`` of ``task.resume_from``, or None."""
    from ray.train import Checkpoint

    from pipeline.cluster import storage_filesystem

    if not task.resume_from:
        return None
    fs, root = storage_filesystem(cfg.storage.storage_path)
    relative = task.resume_from[len(cfg.storage.storage_path.rstrip("/")):].lstrip("/")
    return Checkpoint(path=f"{root.rstrip('/')}/{relative}", filesystem=fs)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, schedule: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine/linear/constant."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))
    return lr + (min_lr - lr) * t


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    logits = logits.float()
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum") / logits.shape[0]
    return -(targets.float() * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def placeholder_step(engine, cfg: Config, device, dtype) -> torch.Tensor:
    """A zero loss for a micro-batch whose samples were all skipped as unreadable: ZeRO-3 needs the
    same forwards and backwards on every rank. One blank image in eval mode (BatchNorm statistics
    untouched); this rank adds zero gradients to the step."""
    engine.eval()
    out = engine(torch.zeros(1, 3, cfg.model.img_size, cfg.model.img_size, device=device, dtype=dtype))
    engine.train()
    return out.float().sum() * 0.0


def forever(loader) -> Iterator:
    """Batches across epoch boundaries (the loader moves to the next epoch after a full pass)."""
    while True:
        yield from loader


def reduce_sum(values: list[torch.Tensor | float], device: torch.device) -> torch.Tensor:
    """``values`` summed over all ranks in one all_reduce issued on the training ``device`` (on GPU
    workers NCCL carries it; the group has a CPU backend too, but a reduction belongs where the
    values live): a float64 tensor on ``device``. Every rank calls it with as many values."""
    import torch.distributed as dist

    local = torch.stack([v.detach().to(device, torch.float64).reshape(()) if torch.is_tensor(v)
                         else torch.tensor(float(v), dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(local)
    return local


@torch.no_grad()
def evaluate(engine, loader, *, device, dtype, label_type: str) -> dict[str, float]:
    """``pipeline.evaluate.Scores`` over the whole val split, summed across ranks. Every rank runs
    ``len(loader)`` forwards (ZeRO-3 gathers parameters in each)."""
    engine.eval()
    scores = Scores(label_type)
    to_device = loader.batch_transform()     # uint8 -> normalised float on the device
    loader.set_epoch(0)       # the loader ends each pass at epoch 1; every evaluation reads epoch 0
    for batch in loader:
        if not len(batch):                 # every sample of it was unreadable: still one forward
            engine(torch.zeros(1, 3, *engine.module.img_size, device=device, dtype=dtype))
            continue
        images, _ = to_device(batch, device)
        scores.update(engine(images.to(dtype)), batch.labels.to(device))
    scores.all_reduce(device)
    engine.train()
    return {f"eval/{k}": v for k, v in scores.result().items()}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train_loop_per_worker(task: TrainTask) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from pipeline.data import StreamingLoader
    from pipeline.data.mixture import MixedLoader, Source

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = fit_batch_to_world(task.cfg(), world)     # elastic: the global batch stays, accumulation moves
    t = cfg.train
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    if cfg.scaling.use_gpu:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    run_key = f"{cfg.storage.storage_path.rstrip('/')}/{cfg.storage.name}"
    callbacks = build_callbacks(t.callbacks)
    for cb in callbacks:
        cb.on_start(rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    # what killed workers of this run left on this node (any rank's), before anyone here saves
    stale = checkpoint.clear_node_leftovers(run_key) if ctx.get_local_rank() == 0 else 0
    dist.barrier()
    torch.manual_seed(cfg.data.seed)   # same init on every rank (zero.Init/ZeRO-3 broadcast anyway)

    # -- data ----------------------------------------------------------------------------------
    # loader workers decode, crop and flip; they hand over uint8 (4x less than float, pinned on GPU
    # nodes), and normalisation, label smoothing, MixUp/CutMix (and, with augment.randaug_device,
    # RandAugment) run batched on the training device, seeded by each batch
    common = dict(rank=rank, world_size=world, batch_size=t.micro_batch, img_size=cfg.model.img_size,
                  seed=cfg.data.seed, num_workers=cfg.data.loader_workers, augment=cfg.data.augment,
                  pin_memory=cfg.scaling.use_gpu, output="uint8")
    # data.decode_device=cuda: the workers hand over the JPEG bytes and the crops they drew;
    # to_device decodes them on this GPU (nvjpeg) before the transform
    decode = "device" if cfg.data.decode_device == "cuda" else "worker"
    if cfg.data.sources:
        train_loader = MixedLoader([Source(name, url, weight) for name, url, weight in cfg.data.train_sources()],
                                   train=True, decode=decode, **common)
    else:
        train_loader = StreamingLoader(cfg.data.train_url, train=True, decode=decode,
                                       samples_per_epoch=cfg.data.samples_per_epoch, **common)
    val_loader = (StreamingLoader(cfg.data.val_url, train=False, **common)
                  if cfg.data.val_url else None)
    to_device = train_loader.batch_transform()

    # -- engine, and the state to continue from -------------------------------------------------
    step, samples_seen, skipped_before = 0, 0, 0
    resumed = ray.train.get_checkpoint() or resume_point(task, cfg)
    with resumed.as_directory() if resumed is not None else contextlib.nullcontext() as ckdir:
        saved = checkpoint.read_state(ckdir) if ckdir else None
        # another world size than the checkpoint's: reshard through DeepSpeed's universal format
        reshard = saved is not None and saved.world_size not in (None, world)
        ds_config = deepspeed_config(cfg)
        if reshard:
            ds_config["checkpoint"] = {"load_universal": True}
        engine, optimizer = build_engine(cfg, ds_config)
        ema = None
        if saved is None and cfg.init.from_checkpoint:     # a resume overwrites them: read only when new
            init = load_init_weights(engine, cfg)
            if rank == 0:
                task.say(f"init: {cfg.init.from_checkpoint} streamed into the partitions "
                         f"({init.bytes_read / 2**20:.0f} MiB read by rank 0 of {world})"
                         + (f"; re-initialised {len(init.dropped)} tensors (new head/shape): "
                            f"{init.dropped[:4]}" if init.dropped else ""))
        if saved is not None:
            universal, convert_s = None, 0.0
            if reshard:
                # once per node: its first rank converts, every rank of the node reads the result
                universal = checkpoint.node_universal_dir(run_key, saved.step)
                t0 = time.perf_counter()
                if ctx.get_local_rank() == 0:
                    checkpoint.to_universal(ckdir, universal)
                dist.barrier()
                convert_s = time.perf_counter() - t0
            state, ema = checkpoint.load(engine, ckdir, rank=rank, universal=universal, ema=bool(t.ema_decay))
            if universal:
                dist.barrier()
                if ctx.get_local_rank() == 0:
                    shutil.rmtree(universal, ignore_errors=True)
            step, samples_seen, skipped_before = state.step, state.samples_seen, state.skipped_samples
            train_loader.load_state_dict(state.loader)
            if rank == 0:
                task.say(f"resumed from step {step} ({samples_seen} samples seen)"
                         + (f"; resharded from {saved.world_size} to {world} workers, "
                            f"grad_accum {t.grad_accum} (universal checkpoint made once per node "
                            f"in {convert_s:.1f} s)" if reshard else "")
                         + (f"; removed {stale} local folder(s) an earlier attempt left" if stale else ""))
    if rank == 0:     # one save per folder: what an interrupted save of a later step left goes first
        unfinished = checkpoint.clear_unfinished_saves(cfg.storage.storage_path, cfg.storage.name, after_step=step,
                                                       timeout_s=t.upload_timeout_s, say=task.say)
        if unfinished:
            task.say(f"removed {len(unfinished)} checkpoint folder(s) an interrupted save left: "
                     + ", ".join(unfinished))
    if t.ema_decay and ema is None:      # a new run, or a checkpoint without one: from the weights as loaded
        ema = [p.to(p.device, torch.float32, copy=True) for p in master_partitions(engine)]   # the fp32 masters
    dtype = compute_dtype(cfg)
    for cb in callbacks:
        cb.on_train_start(engine, step=step, rank=rank, ema=ema)

    total, warmup = task.total_steps, task.warmup_steps
    tracking.fast_fail_env()
    log = MetricsLogger(cfg.tracking.tracking_uri, task.mlflow_run_id, enabled=rank == 0, say=task.say)
    system = SystemMetrics(cfg.tracking, task.mlflow_run_id, enabled=rank == 0)

    def skipped_total() -> int:
        return skipped_before + int(reduce_sum([train_loader.stats.skipped], device).item())

    upload = checkpoint.uploader(cfg.storage.storage_path, cfg.storage.name, timeout_s=t.upload_timeout_s,
                                 say=task.say if rank == 0 else print)

    def save_and_report(metrics: dict[str, float]) -> None:
        started = time.time()
        state = TrainState(step=step, samples_seen=samples_seen, total_steps=total,
                           loader=train_loader.state_dict(), config=redact_values(task.config),
                           label_type=task.label_type, skipped_samples=skipped_total(),
                           mlflow_run_id=task.mlflow_run_id, world_size=world)
        folder = checkpoint.save(engine, rank=rank, state=state, run_key=run_key, ema=ema)
        if step == total:        # the final model, whole, for the driver to publish as it is
            export_weights(engine, os.path.join(folder, WEIGHTS_DIR), rank=rank)
            if ema is not None:
                export_weights(engine, os.path.join(folder, EMA_WEIGHTS_DIR), rank=rank, ema=ema)
        for cb in callbacks:
            cb.on_save(step, folder)
        dir_name = f"checkpoint_{step:08d}"
        ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(folder),
                         checkpoint_dir_name=dir_name,
                         checkpoint_upload_fn=upload, delete_local_checkpoint_after_upload=True)
        log.log({"train/checkpoint_s": time.time() - started}, step)   # on the critical path (sync upload)

    # -- steps ---------------------------------------------------------------------------------
    notice = TerminationNotice().install()
    grow = GrowRequests(task.grow_key)
    preemption_seen = False
    checkpointed_at = time.time()
    batches = forever(train_loader)
    engine.train()
    window_t, window_n = time.time(), 0
    loss_window = torch.zeros((), device=device)        # read back at log steps only: no host sync
    window_steps = 0
    while step < total:
        lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup=warmup, total=total, schedule=t.schedule)
        for g in optimizer.param_groups:
            g["lr"] = lr
        keys: list[str] = []
        for _ in range(t.grad_accum):
            batch = next(batches)
            if len(batch):
                images, targets = to_device(batch, device)
                loss = loss_fn(engine(images.to(dtype)), targets, t.loss)
            else:
                loss = placeholder_step(engine, cfg, device, dtype)
            engine.backward(loss)
            engine.step()                      # an optimizer step at the accumulation boundary
            loss_window += loss.detach() / t.grad_accum
            keys += batch.keys
            window_n += len(batch)
        step += 1
        window_steps += 1
        samples_seen += t.global_batch
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, master_partitions(engine)):     # the fp32 master weights
                    e.mul_(t.ema_decay).add_(p.to(e.device, non_blocking=True), alpha=1 - t.ema_decay)
        for cb in callbacks:
            cb.on_step(step, keys)

        # every step, one CPU scalar (the group's gloo backend: no wait on the GPU's queue): did a
        # SIGTERM reach any rank? Then every rank checkpoints this step and stops.
        vote = torch.tensor([notice.received], dtype=torch.int32)
        dist.all_reduce(vote)
        stop = bool(vote.item())
        due = grow_asked = False               # a checkpoint asked for by the clock, a preemption, a grow
        if step % t.log_every == 0 or step == total:
            # one collective per log step: the loss window, skipped samples, each source's draws, and
            # rank 0's time since the last checkpoint (the same number for every rank to decide on)
            # and whether the controller asks to grow the group (elastic runs; rank 0 reads it)
            counts = getattr(train_loader, "source_samples", None) or {}
            since = time.time() - checkpointed_at if rank == 0 else 0.0
            request = grow.pending() if rank == 0 else None
            loss_sum, skipped, since, grow_asked, *drawn = reduce_sum(
                [loss_window, train_loader.stats.skipped, since, request is not None, *counts.values()],
                device).tolist()
            due = bool(t.checkpoint_every_minutes and since >= 60 * t.checkpoint_every_minutes)
            if grow_asked:
                due = True
                if rank == 0:
                    task.say(f"step {step}: more resources for {request['to']} workers: checkpointing "
                             "before the group restarts on them")
            preemption = ray.train.get_preemption_info()     # a barrier: every rank asks at the same steps
            if preemption is not None and not preemption_seen:
                preemption_seen = due = True
                if rank == 0:
                    task.say(f"step {step}: preemption notice for node(s) {', '.join(preemption.preempted_node_ids)}"
                             f" (ranks {preemption.preempted_ranks}): checkpointing now")
            now = time.time()
            ips = window_n * world / max(1e-9, now - window_t)
            gn = engine.get_global_grad_norm()
            m = {"train/loss": loss_sum / world / window_steps, "train/lr": lr,
                 "train/grad_norm": float(gn) if gn is not None else float("nan"),
                 "train/images_per_s": ips, "train/samples_seen": samples_seen,
                 "train/skipped_samples": skipped_before + int(skipped),
                 **{f"data/{name}/samples": n for name, n in zip(counts, drawn)}}
            window_t, window_n, window_steps = now, 0, 0
            loss_window.zero_()
            log.log(m, step)
            if rank == 0:
                eta = (total - step) * t.global_batch / max(ips, 1e-9)
                task.say(f"step {step:>6}/{total}  loss {m['train/loss']:.4f}  lr {lr:.2e}  "
                         f"{ips:7.1f} img/s  ETA {eta / 60:5.1f} min")

        last = step == total
        metrics: dict[str, float] = {}
        if val_loader is not None and ((t.eval_every and step % t.eval_every == 0) or last):
            metrics = evaluate(engine, val_loader, device=device, dtype=dtype, label_type=task.label_type)
            if ema is not None:                      # the paper's EMA weights, judged on the same data
                with swapped_in(engine, ema):
                    ema_metrics = evaluate(engine, val_loader, device=device, dtype=dtype,
                                           label_type=task.label_type)
                metrics.update({k.replace("eval/", "eval_ema/", 1): v for k, v in ema_metrics.items()})
            log.log(metrics, step)
            if rank == 0:
                task.say(f"eval  step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or last or stop or due:
            save_and_report(metrics)
            checkpointed_at = time.time()
        elif metrics:
            ray.train.report({**metrics, "step": step})
        if grow_asked and not last:
            # the checkpoint is reported: the controller restarts the group on more workers now and
            # this process ends here; should it withdraw (the resources went away), training goes on
            if rank == 0:
                grow.answer(request, step)
                grow.wait_for_restart(timeout_s=300)
            dist.barrier()
        if stop and not last:
            if rank == 0:
                task.say(f"step {step}: SIGTERM reached the group: checkpoint_{step:08d} written, stopping "
                         "(Ray Train resumes from it)")
            raise TrainingStopped(f"stopped after step {step} on SIGTERM; checkpoint_{step:08d} holds it")

    # -- end -----------------------------------------------------------------------------------
    for cb in callbacks:
        cb.on_end(engine, rank=rank)
    system.stop()
    log.close(timeout_s=cfg.tracking.outage_timeout_s)
    if log.dropped:
        log.log({"train/dropped_metric_values": log.dropped}, step)
