"""The per-worker training loop (runs inside each Ray Train worker), top to bottom:

    setup -> data -> model -> DeepSpeed ZeRO-3 engine -> resume -> [step, log, eval, checkpoint]* -> end

``train_loop_per_worker(plan)`` is what ``pipeline.launch`` hands to ``TorchTrainer``; ``plan`` is
the JSON-able dict from ``launch.make_plan`` (resolved config + derived numbers + MLflow run id).
A fine-tuning stage reuses it as-is: set ``init.from_checkpoint`` (an fp32 ``model.pt``) and the
new ``model.img_size``/``num_classes``; ``build_model`` resizes and swaps the head.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import checkpoint as ckpt
from pipeline.config import Config
from pipeline.tracking import MetricsLogger


# ---------------------------------------------------------------------------------------------
# Pieces (each usable alone)
# ---------------------------------------------------------------------------------------------

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


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    t, d = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                            "stage3_gather_16bit_weights_on_model_save": False}
    if d.offload != "none":
        dev = {"device": d.offload}
        if d.offload == "nvme":
            dev["nvme_path"] = d.nvme_path
        zero["offload_param"] = dict(dev)
        zero["offload_optimizer"] = dict(dev)
    out: dict[str, Any] = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "bf16": {"enabled": t.bf16},
        "zero_optimization": zero,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if t.clip_grad:
        out["gradient_clipping"] = t.clip_grad
    return _merge(out, d.extra)


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``. With ZeRO-Offload the step runs on the host, where DeepSpeed
    refuses torch's AdamW (too slow) and wants its vectorised DeepSpeedCPUAdam (a C++ op it
    JIT-builds once); without offload torch's AdamW needs no build."""
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    if cfg.deepspeed.offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=tuple(t.betas), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_model(cfg: Config, ds_config: dict[str, Any]) -> torch.nn.Module:
    """The variant from ``models.create_model``; under ``deepspeed.zero.Init`` when ``model.zero_init``
    (built already partitioned: needed when one rank cannot hold the full model)."""
    import deepspeed
    import models

    m = cfg.model
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=m.zero_init):
        model = models.create_model(m.variant, num_classes=m.num_classes, img_size=m.img_size,
                                    drop_path_rate=m.drop_path_rate,
                                    grad_checkpointing=m.grad_checkpointing)
    if cfg.init.from_checkpoint:
        sd = ckpt.load_weights(cfg.init.from_checkpoint)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0,
                                               enabled=m.zero_init):
            if not m.zero_init or dist.get_rank() == 0:
                sd, dropped = ckpt.adapt_state_dict(model, sd, img_size=m.img_size,
                                                    reset_head=cfg.init.reset_head, strict=cfg.init.strict)
                model.load_state_dict(sd, strict=False)
                if dropped:
                    print(f"init: re-initialised {len(dropped)} tensors (new head/shape): {dropped[:4]}")
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay off for ``model.no_weight_decay()`` names (norms, biases, bias tables)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    logits = logits.float()
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum") / logits.shape[0]
    return -(targets.float() * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def forever(loader) -> Iterator:
    """Batches across epoch boundaries (the loader moves to the next epoch after a full pass)."""
    while True:
        yield from loader


@torch.no_grad()
def evaluate(engine, loader, *, device, dtype, label_type: str, kind: str) -> dict[str, float]:
    """Top-1/top-5 (multi-label: precision@1, recall@5 of a positive) over the whole val split.
    Every rank runs ``len(loader)`` forwards (ZeRO-3 gathers params in each); sums are all-reduced."""
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64)   # correct1, correct5, count, loss_sum
    loader.set_epoch(0)
    for batch in loader:
        batch = batch.to(device)
        logits = engine(batch.images.to(dtype)).float()
        n = logits.shape[0]
        top5 = logits.topk(min(5, logits.shape[1]), dim=-1).indices
        if label_type == "multi":
            pos = batch.labels > 0.5
            c1 = pos.gather(1, top5[:, :1]).any(1).sum()
            c5 = pos.gather(1, top5).any(1).sum()
        else:
            c1 = (top5[:, 0] == batch.labels).sum()
            c5 = (top5 == batch.labels[:, None]).any(1).sum()
        sums += torch.tensor([float(c1), float(c5), n, float(loss_fn(logits, batch.targets, kind)) * n],
                             dtype=torch.float64)
    # the loader ends each pass at epoch 1; the next evaluation starts epoch 0 again
    dist.all_reduce(sums)
    engine.train()
    c1, c5, n, loss = sums.tolist()
    if label_type == "multi":
        return {"eval/precision_at_1": c1 / n, "eval/top5": c5 / n, "eval/loss": loss / n}
    return {"eval/top1": c1 / n, "eval/top5": c5 / n, "eval/loss": loss / n}


def _partitions(model) -> list[torch.Tensor]:
    return [p.ds_tensor for p in model.parameters() if hasattr(p, "ds_tensor")]


def partition_numel(model) -> int:
    """Parameters this rank holds under ZeRO-3 (sum of its partitions)."""
    return sum(t.numel() for t in _partitions(model))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train_loop_per_worker(plan: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from pipeline.data import AugmentConfig, StreamingLoader

    cfg = Config.model_validate(plan["config"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    if cfg.scaling.use_gpu:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if t.debug_pid_dir:
        os.makedirs(t.debug_pid_dir, exist_ok=True)
        with open(os.path.join(t.debug_pid_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    torch.manual_seed(cfg.data.seed)   # same init on every rank (zero.Init/ZeRO-3 broadcast anyway)

    # -- data ----------------------------------------------------------------------------------
    a = cfg.data.augment
    augment = AugmentConfig(randaug_n=a.randaug_n, randaug_m=a.randaug_m, mixup_alpha=a.mixup_alpha,
                            cutmix_alpha=a.cutmix_alpha, label_smoothing=t.label_smoothing,
                            crop_scale=tuple(a.crop_scale), hflip=a.hflip)
    common = dict(rank=rank, world_size=world, batch_size=t.micro_batch, img_size=cfg.model.img_size,
                  seed=cfg.data.seed, num_workers=cfg.data.loader_workers, augment=augment)
    train_loader = StreamingLoader(cfg.data.train_url, train=True,
                                   samples_per_epoch=cfg.data.samples_per_epoch, **common)
    val_loader = (StreamingLoader(cfg.data.val_url, train=False, **common)
                  if cfg.data.val_url else None)
    label_type = train_loader.index.label_type

    # -- model, optimizer, engine --------------------------------------------------------------
    ds_config = deepspeed_config(cfg)
    model = build_model(cfg, ds_config)
    optimizer = build_optimizer(cfg, model)
    dtype = torch.bfloat16 if t.bf16 else torch.float32
    for b in model.buffers():          # DeepSpeed casts parameters; BatchNorm stats must follow
        if b.is_floating_point():
            b.data = b.data.to(dtype)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ema = [p.detach().float().clone() for p in _partitions(engine.module)] if t.ema_decay else None

    # -- resume --------------------------------------------------------------------------------
    step, samples_seen, skipped_base = 0, 0, 0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state, ema_loaded = ckpt.load(engine, d, rank=rank)
        step, samples_seen = state["step"], state["samples_seen"]
        skipped_base = state.get("skipped_samples", 0)
        train_loader.load_state_dict(state["loader"])
        if ema is not None and ema_loaded is not None:
            ema = ema_loaded
        if rank == 0:
            print(f"resumed from step {step} ({samples_seen} samples seen)", flush=True)

    total, warmup = plan["total_steps"], plan["warmup_steps"]
    log = MetricsLogger(cfg.tracking.tracking_uri, plan.get("mlflow_run_id"), enabled=rank == 0)
    keys_file = None
    if t.debug_keys_dir:
        os.makedirs(t.debug_keys_dir, exist_ok=True)
        keys_file = open(os.path.join(t.debug_keys_dir, f"keys.rank{rank}.jsonl"), "a")

    def save_and_report(metrics: dict[str, float]) -> None:
        state = {"step": step, "samples_seen": samples_seen, "loader": train_loader.state_dict(),
                 "skipped_samples": skipped_base + train_loader.stats.skipped,
                 "total_steps": total, "mlflow_run_id": plan.get("mlflow_run_id"),
                 "config": plan["config"], "label_type": label_type}
        d = ckpt.save(engine, None, rank=rank, state=state, ema=ema)
        ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")

    # -- steps ---------------------------------------------------------------------------------
    batches = forever(train_loader)
    engine.train()
    t0, window_t, window_n = time.time(), time.time(), 0
    first_step_s = None
    while step < total:
        lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup=warmup, total=total, schedule=t.schedule)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum, keys = 0.0, []
        for _ in range(t.grad_accum):
            batch = next(batches).to(device)
            loss = loss_fn(engine(batch.images.to(dtype)), batch.targets, t.loss)
            engine.backward(loss)
            engine.step()                      # an optimizer step at the accumulation boundary
            loss_sum += float(loss) / t.grad_accum
            keys += batch.keys
            window_n += len(batch)
        step += 1
        samples_seen += t.global_batch
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, _partitions(engine.module)):
                    e.mul_(t.ema_decay).add_(p.float(), alpha=1 - t.ema_decay)
        if keys_file:
            keys_file.write(json.dumps({"step": step, "keys": keys}) + "\n")
            keys_file.flush()
        if first_step_s is None:
            first_step_s = time.time() - t0
        if t.debug_step_sleep:
            time.sleep(t.debug_step_sleep)

        if step % t.log_every == 0 or step == total:
            loss_t = torch.tensor([loss_sum], dtype=torch.float64)
            dist.all_reduce(loss_t)
            now = time.time()
            ips = window_n * world / max(1e-9, now - window_t)
            window_t, window_n = now, 0
            gn = engine.get_global_grad_norm()
            m = {"train/loss": loss_t.item() / world, "train/lr": lr,
                 "train/grad_norm": float(gn) if gn is not None else float("nan"),
                 "train/images_per_s": ips, "train/samples_seen": samples_seen,
                 "train/skipped_samples": skipped_base + train_loader.stats.skipped}
            log.log(m, step)
            if rank == 0:
                eta = (total - step) * t.global_batch / max(ips, 1e-9)
                print(f"step {step:>6}/{total}  loss {m['train/loss']:.4f}  lr {lr:.2e}  "
                      f"{ips:7.1f} img/s  ETA {eta / 60:5.1f} min", flush=True)

        last = step == total
        metrics: dict[str, float] = {}
        if val_loader is not None and ((t.eval_every and step % t.eval_every == 0) or last):
            metrics = evaluate(engine, val_loader, device=device, dtype=dtype,
                               label_type=label_type, kind=t.loss)
            log.log(metrics, step)
            if rank == 0:
                print(f"eval  step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                      flush=True)
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or last:
            save_and_report(metrics)
        elif metrics:
            ray.train.report({**metrics, "step": step})

    # -- end -----------------------------------------------------------------------------------
    if t.debug_dump_weights:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            if rank == 0:
                torch.save({"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
                            "partition_numel": partition_numel_all(engine.module),
                            "first_step_s": first_step_s},
                           t.debug_dump_weights)
        # every rank's partition size, for the test of ZeRO-3 partitioning
        with open(f"{t.debug_dump_weights}.rank{rank}.json", "w") as f:
            json.dump({"partition_numel": partition_numel(engine.module),
                       "total_numel": sum(p.ds_numel for p in engine.module.parameters())}, f)
    if keys_file:
        keys_file.close()


def partition_numel_all(model) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
