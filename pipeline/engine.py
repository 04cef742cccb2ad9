"""DeepSpeed ZeRO-3 from the typed config: the DeepSpeed config, the model, the optimizer, the engine.

One source of ZeRO settings: the profile files in ``infra/deepspeed/`` (``zero3_bf16.json``,
``zero3_offload_cpu.json``, ``zero3_offload_nvme.json``, chosen by ``deepspeed.offload``) are what
``deepspeed_config`` reads; it fills their ``"auto"`` batch fields and the fields the typed config
owns (bf16, gradient clipping, NVMe path), then merges ``deepspeed.extra`` last.

    ds_config = deepspeed_config(cfg, use_gpu=cfg.scaling.use_gpu)
    engine, optimizer = build_engine(cfg, ds_config)     # inside a worker, process group up
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import Config

PROFILE_DIR = Path(__file__).resolve().parents[1] / "infra" / "deepspeed"
PROFILES = {"none": "zero3_bf16.json", "cpu": "zero3_offload_cpu.json", "nvme": "zero3_offload_nvme.json"}
# set from the typed config, never from a profile file
OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
         "bf16", "gradient_clipping")


def read_profile(offload: str) -> dict[str, Any]:
    """The ZeRO profile for ``deepspeed.offload`` (comments dropped)."""
    data = json.loads((PROFILE_DIR / PROFILES[offload]).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def deepspeed_config(cfg: Config, *, use_gpu: bool | None = None) -> dict[str, Any]:
    """The profile with the typed config's values filled in. ``overlap_comm`` stays as the profile
    says on GPUs (NCCL overlaps reduce-scatter with backward) and is off on CPU workers, where gloo
    runs collectives on the compute threads and overlapping only adds contention."""
    t, d = cfg.train, cfg.deepspeed
    use_gpu = cfg.scaling.use_gpu if use_gpu is None else use_gpu
    out = read_profile(d.offload)
    out.update(train_batch_size=t.global_batch, train_micro_batch_size_per_gpu=t.micro_batch,
               gradient_accumulation_steps=t.grad_accum, bf16={"enabled": t.bf16},
               steps_per_print=10 ** 9, wall_clock_breakdown=False)
    if t.clip_grad:
        out["gradient_clipping"] = t.clip_grad
    else:
        out.pop("gradient_clipping", None)
    zero = out["zero_optimization"]
    zero["overlap_comm"] = bool(zero.get("overlap_comm", False)) and use_gpu
    if d.overlap_comm is not None:
        zero["overlap_comm"] = d.overlap_comm
    if d.offload == "nvme":
        for part in ("offload_optimizer", "offload_param"):
            zero[part]["nvme_path"] = d.nvme_path
    if not use_gpu:
        for part in ("offload_optimizer", "offload_param"):
            if part in zero:
                zero[part]["pin_memory"] = False   # nothing to pin for on a CPU-only worker
    return _merge(out, d.extra)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_model(cfg: Config, ds_config: dict[str, Any]) -> torch.nn.Module:
    """The variant from ``models.create_model``; under ``deepspeed.zero.Init`` when ``model.zero_init``
    (built already partitioned: needed when one rank cannot hold the full model). With
    ``init.from_checkpoint`` the weights are loaded (tables resized, new head re-initialised)."""
    import deepspeed

    import models
    from pipeline import checkpoint

    m = cfg.model
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=m.zero_init):
        model = models.create_model(m.variant, num_classes=m.num_classes, img_size=m.img_size,
                                    drop_path_rate=m.drop_path_rate, attn_backend=m.attn_backend,
                                    grad_checkpointing=m.grad_checkpointing)
    if cfg.init.from_checkpoint:
        sd = checkpoint.load_weights(cfg.init.from_checkpoint)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0,
                                               enabled=m.zero_init):
            if not m.zero_init or dist.get_rank() == 0:
                sd, dropped = checkpoint.adapt_state_dict(model, sd, img_size=m.img_size,
                                                          reset_head=cfg.init.reset_head,
                                                          strict=cfg.init.strict)
                model.load_state_dict(sd, strict=False)
                if dropped:
                    print(f"init: re-initialised {len(dropped)} tensors (new head/shape): {dropped[:4]}")
    return model


def full_shape(p: torch.nn.Parameter) -> torch.Size:
    """A parameter's shape, also once ZeRO-3 has partitioned it (then ``p.shape`` is empty)."""
    return getattr(p, "ds_shape", p.shape)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and conv kernels; off for ``model.no_weight_decay()`` names (norms,
    biases, relative-position bias tables) and for every other vector. Decided by the FULL shape:
    under ``deepspeed.zero.Init`` a parameter's own shape is (0,) on every rank."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip or len(full_shape(p)) <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``. With ZeRO-Offload the step runs on the host, where DeepSpeed
    refuses torch's AdamW (too slow) and wants its vectorised DeepSpeedCPUAdam (a C++ op it
    JIT-builds once). On GPUs torch's fused AdamW; on CPU its foreach AdamW (no build)."""
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    if cfg.deepspeed.offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=tuple(t.betas), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), fused=cfg.scaling.use_gpu or None)


def build_engine(cfg: Config, ds_config: dict[str, Any]):
    """(engine, optimizer): model, optimizer and ``deepspeed.initialize`` in one call."""
    import deepspeed

    model = build_model(cfg, ds_config)
    optimizer = build_optimizer(cfg, model)
    dtype = compute_dtype(cfg)
    for b in model.buffers():          # DeepSpeed casts parameters; BatchNorm stats must follow
        if b.is_floating_point():
            b.data = b.data.to(dtype)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if cfg.model.compile if cfg.model.compile is not None else cfg.scaling.use_gpu:
        # DeepSpeed's own torch.compile integration: it knows where ZeRO-3 gathers and releases
        # parameters (compiling the blocks ourselves breaks ZeRO-3's backward: released parameters)
        engine.compile()
    return engine, optimizer


def compute_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.train.bf16 else torch.float32


def partitions(model: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's ZeRO-3 partitions, in parameter order."""
    return [p.ds_tensor for p in model.parameters() if hasattr(p, "ds_tensor")]
