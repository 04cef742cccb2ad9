"""DeepSpeed ZeRO-3 from the typed config: the DeepSpeed config, the model, the optimizer, the engine.

One source of ZeRO settings: the profile files in ``infra/deepspeed/`` (``zero3_bf16.json``,
``zero3_offload_cpu.json``, ``zero3_offload_nvme.json``, chosen by ``deepspeed.offload``) are what
``deepspeed_config`` reads; it fills their ``"auto"`` batch fields and the fields the typed config
owns (bf16, gradient clipping, NVMe path), then merges ``deepspeed.extra`` last.

    ds_config = deepspeed_config(cfg, use_gpu=cfg.scaling.use_gpu)
    engine, optimizer = build_engine(cfg, ds_config)     # inside a worker, process group up
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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
    (built already partitioned: needed when one rank cannot hold the full model). Initial weights
    (``init.from_checkpoint``) come later, into the engine's partitions: ``load_init_weights``."""
    import deepspeed

    import models

    m = cfg.model
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=m.zero_init):
        return models.create_model(m.variant, num_classes=m.num_classes, img_size=m.img_size,
                                   drop_path_rate=m.drop_path_rate, attn_backend=m.attn_backend,
                                   grad_checkpointing=m.grad_checkpointing, **m.architecture())


def load_init_weights(engine, cfg: Config) -> "InitLoad":
    """Fine-tuning's source weights (``init.from_checkpoint``) streamed into this rank's ZeRO-3
    partitions: the rank reads only the elements it owns (a ranged read per partition,
    ``weights.WeightReader``, ~64 MB of them fetched together), so a model is never whole on any
    rank and the ranks together read it once. The surgery is ``weights.adapt_state_dict``'s, planned on the files'
    headers against a meta-device network: bias tables (small) are read whole and resized, a head
    that does not fit is left as initialised. Written are the optimizer's fp32 master partition
    (exact: not rounded through bf16, which DeepSpeed's masters would be if the module were loaded
    before ``initialize``), the bf16 copy the forward uses, the persistent parameters re-gathered,
    and the buffers (BatchNorm statistics, whole on every rank). Every rank calls it after
    ``deepspeed.initialize``; a parameter swapped to NVMe (``deepspeed.offload=nvme``) is refused."""
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus
    from deepspeed.utils import safe_set_local_fp32_param

    import models
    from pipeline.weights import WeightReader, adapt_state_dict

    m = cfg.model
    reader = WeightReader(cfg.init.from_checkpoint)
    source = reader.shapes()
    tables = [name for name in source if name.endswith("relative_position_bias_table")]
    for name, values in zip(tables, reader.read_many([(name, 0, None) for name in tables])):
        source[name] = values.view(source[name].shape).float()     # small, resized on real values
    network = models.create_model(m.variant, num_classes=m.num_classes, img_size=m.img_size,
                                  device="meta", **m.architecture())
    planned, dropped = adapt_state_dict(network, source, img_size=m.img_size,
                                        reset_head=cfg.init.reset_head, strict=cfg.init.strict)
    rank = dist.get_rank() if dist.is_initialized() else 0

    # what this rank writes: (the tensor it goes to, the source name, the element range of the flat
    # source tensor); a parameter not in ``planned`` is a re-initialised head (or, not strict, left out)
    module = engine.module
    targets: list[tuple[torch.Tensor, str, int, int]] = []
    persistent = []
    for name, p in module.named_parameters():
        if name not in planned:
            continue
        if not hasattr(p, "ds_tensor"):        # not partitioned: the whole tensor
            targets.append((p, name, 0, p.numel()))
            continue
        if p.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE:
            raise RuntimeError(f"init.from_checkpoint: {name} is swapped to NVMe; fine-tune with "
                               "deepspeed.offload=cpu or none")
        size = p.ds_tensor.numel()             # DeepSpeed pads the last rank's partition
        start = min(rank * size, p.ds_numel)
        targets.append((p, name, start, min(start + size, p.ds_numel)))
        if getattr(p, "ds_persist", False):
            persistent.append(p)
    for prefix, sub in module.named_modules():
        for bname, b in sub._buffers.items():
            key = f"{prefix}.{bname}" if prefix else bname
            if b is not None and key in planned:
                targets.append((b, key, 0, b.numel()))

    def write(target: torch.Tensor, values: torch.Tensor) -> None:
        if not hasattr(target, "ds_tensor"):
            target.copy_(values.view(target.shape).to(target.dtype))
            return
        part = torch.zeros(target.ds_tensor.numel(), dtype=torch.float32)
        part[:values.numel()] = values
        target.ds_tensor.data.copy_(part.to(target.ds_tensor.device, target.ds_tensor.dtype))
        if target.requires_grad and getattr(target, "_z3_optimizer", None) is not None:
            safe_set_local_fp32_param(target, part.to(target.ds_tensor.device))

    def fetch(batch: list[tuple[torch.Tensor, str, int, int]]) -> None:
        fetched = iter(reader.read_many([(n, a, b) for _, n, a, b in batch if planned[n].is_meta]))
        for target, n, a, b in batch:
            write(target, (next(fetched) if planned[n].is_meta else planned[n].flatten()[a:b]).float())

    with torch.no_grad():
        batch, batch_bytes = [], 0             # ranged reads in batches of ~64 MB, fetched together
        for item in targets:
            batch.append(item)
            batch_bytes += (item[3] - item[2]) * 4
            if batch_bytes >= 64 << 20:
                fetch(batch)
                batch, batch_bytes = [], 0
        fetch(batch)
        if persistent:                         # kept whole on every rank: gathered again
            persistent[0].all_gather(persistent)
    return InitLoad(source=cfg.init.from_checkpoint, dropped=dropped, bytes_read=reader.bytes_read)


@dataclass(frozen=True)
class InitLoad:
    """What ``load_init_weights`` did on this rank."""

    source: str
    dropped: list[str]        # re-initialised (new head) or left out (not strict)
    bytes_read: int           # tensor bytes this rank fetched: about the model's size / world size


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
    fp32_batchnorm_stats(model)
    compile_ = cfg.model.compile if cfg.model.compile is not None else cfg.scaling.use_gpu
    if compile_ and cfg.model.compile_mode == "blocks":
        mark_leaf_blocks(model)          # before initialize: ZeRO-3 registers its hooks there
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if compile_:
        compile_engine(engine, cfg.model.compile_mode)
    return engine, optimizer


def leaf_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks that are ZeRO-3 leaf modules and compiled one graph each: every MBConv and
    Transformer block and the head. Not the stem: its input needs no gradient, so as a leaf its
    weights are released before its backward (DeepSpeed 0.19.8: "size of tensor a (0) must
    match ... (3)"); it stays eager with ZeRO-3's hooks on its three layers."""
    from models.coatnet import Stem

    return [b for b in model.blocks() if not isinstance(b, Stem)]


def mark_leaf_blocks(model: torch.nn.Module) -> int:
    """Make ``leaf_blocks`` ZeRO-3 leaf modules (before ``deepspeed.initialize``): DeepSpeed then
    hooks the block, gathering all its parameters at once, and none of its submodules, so no
    hook runs inside the block's forward. Returns the number of leaves."""
    from deepspeed.utils import set_z3_leaf_modules

    blocks = leaf_blocks(model)
    set_z3_leaf_modules(model, list({type(b) for b in blocks}))
    return len(blocks)


def compile_engine(engine, mode: str = "blocks", backend: str | None = None, **compile_kwargs: Any) -> None:
    """torch.compile under ZeRO-3. ``blocks``: each leaf block's ``forward`` is compiled
    (``model.compile_blocks``), ZeRO-3's gather/release hooks run eagerly around the graphs:
    no graph breaks, one graph per block shape (the leaves must be marked before initialize).
    ``engine``: DeepSpeed's ``engine.compile()`` of the whole module, where ZeRO-3's
    ``torch.compiler.disable``'d hooks on every submodule break the graph at each of them
    (tests/test_engine_compile.py counts both)."""
    if mode == "engine":
        engine.compile(**({"backend": backend} if backend else {}), compile_kwargs=compile_kwargs)
        return
    if backend:
        compile_kwargs["backend"] = backend
    model = engine.module
    model.compile_blocks(blocks=leaf_blocks(model), **compile_kwargs)


def fp32_batchnorm_stats(model: torch.nn.Module) -> int:
    """BatchNorm running statistics in fp32: ``zero.Init`` builds every floating tensor
    in the training dtype and bf16 statistics round away updates below ~0.4% of their value;
    DeepSpeed's engine casts parameters only, so once fp32 they stay fp32 (models' BatchNorm2d
    upcasts its bf16 weights for the call). Returns the number of tensors upcast."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for b in (m.running_mean, m.running_var):
                if b.dtype != torch.float32:
                    b.data = b.data.float()
                    n += 1
    return n


def compute_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.train.bf16 else torch.float32


def partitions(model: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's ZeRO-3 partitions, in parameter order."""
    return [p.ds_tensor for p in model.parameters() if hasattr(p, "ds_tensor")]


def master_partitions(engine) -> list[torch.Tensor]:
    """This rank's fp32 master weights, one tensor per ZeRO-3 partition in ``partitions()`` order:
    views into the optimizer's flat fp32 groups (``fp32_partitioned_groups_flat``, DeepSpeed's
    ``safe_get_local_fp32_param``), the same size as the bf16 partition (``ds_tensor``), so an EMA
    of them keeps the saved format ``checkpoint.load_ema`` re-cuts. The EMA follows these, not the
    bf16 copies the forward uses: at a fine-tuning lr of 5e-5 most updates are below bf16's
    resolution (tests/test_engine_precision.py measures it). With the optimizer swapped to NVMe
    (``deepspeed.offload=nvme``) reading them would swap every group in at every step: there, and
    for a parameter the optimizer does not hold, the bf16 partition upcast."""
    from deepspeed.utils import safe_get_local_fp32_param

    swapped = bool(getattr(engine.optimizer, "swap_optimizer", False))
    out = []
    for p in _zero_params(engine):
        master = safe_get_local_fp32_param(p) if p.requires_grad and not swapped else None
        out.append(p.ds_tensor.detach().float() if master is None else master.detach())
    return out


def _zero_params(engine) -> list[torch.nn.Parameter]:
    return [p for p in engine.module.parameters() if hasattr(p, "ds_tensor")]


@contextlib.contextmanager
def swapped_in(engine, partitions_: list[torch.Tensor]) -> Iterator[None]:
    """For the duration, the engine's module computes with ``partitions_`` (one per ZeRO-3
    partition, in ``partitions()`` order: e.g. the EMA) instead of its weights. Every rank calls it.
    Persistent parameters (small ones ZeRO-3 keeps whole on every rank) are re-gathered, as
    DeepSpeed does after an optimizer step."""
    params = _zero_params(engine)
    persistent = [p for p in params if getattr(p, "ds_persist", False)]
    saved = [p.ds_tensor.data.clone() for p in params]

    def load(values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(params, values):
                p.ds_tensor.data.copy_(v.to(p.ds_tensor.dtype))
            if persistent:
                persistent[0].all_gather(persistent)
    load(partitions_)
    try:
        yield
    finally:
        load(saved)


def gathered_weights(engine, *, rank: int, ema: list[torch.Tensor] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's full fp32 tensors, one parameter at a time: the optimizer's fp32 master weights
    (DeepSpeed's ``safe_get_full_fp32_param``, not the bf16 copies the forward uses) or, with ``ema``,
    the EMA's fp32 partitions (``partitions()`` order) all-gathered; then the buffers a state dict
    holds. Every rank must iterate (each gather is collective); rank 0 gets (name, CPU tensor)
    pairs, the others nothing."""
    from deepspeed.utils import safe_get_full_fp32_param

    ema_parts = iter(ema or ())
    for name, p in engine.module.named_parameters():
        if not hasattr(p, "ds_tensor"):                  # not partitioned (no ZeRO-3 on it)
            full = p
        elif ema is None:
            full = safe_get_full_fp32_param(p)
        else:
            part = next(ema_parts).to(p.ds_tensor.device, torch.float32).contiguous()
            gathered = torch.empty(dist.get_world_size() * part.numel(), dtype=torch.float32, device=part.device)
            dist.all_gather_into_tensor(gathered, part)
            full = gathered[:p.ds_numel].view(p.ds_shape)
        if rank == 0:
            yield name, full.detach().to("cpu", torch.float32)
    if rank == 0:                          # buffers are not partitioned
        for prefix, module in engine.module.named_modules():
            for bname, b in module._buffers.items():
                if b is not None and bname not in module._non_persistent_buffers_set:
                    yield f"{prefix}.{bname}" if prefix else bname, b.detach().cpu()


def export_weights(engine, out_dir: str, *, rank: int, ema: list[torch.Tensor] | None = None) -> None:
    """The model's full fp32 weights (or, with ``ema``, the EMA model) as safetensors in ``out_dir``
    (``pipeline.weights`` layout, written by rank 0), one parameter gathered at a time: never the
    whole model in memory at once, and no consolidation of checkpoint files on a driver. Every rank
    calls it."""
    from pipeline.weights import write_weights

    tensors = gathered_weights(engine, rank=rank, ema=ema)
    if rank == 0:
        write_weights(out_dir, tensors)
    else:
        for _ in tensors:
            pass
