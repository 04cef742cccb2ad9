"""Capacity planning for CoAtNet pretraining with DeepSpeed ZeRO-3 (the logic behind `jobs/capacity.py`).

What it answers, for a variant, resolution, dataset size, epochs, global batch, GPU type and count:

- compute: multiply-accumulates (MACs) per image from the model's OWN counter
  (``models.count_flops`` at batch 1 on a model built on the ``meta`` device - equal to the count
  on a real CPU model, as tested - so even CoAtNet-7 costs no memory); FLOPs = 2 x MACs; one training step ~= 3 x the forward FLOPs (forward + backward for
  activations and weights); total = 3 x 2 x MACs x images x epochs. Activation checkpointing
  recomputes the forward (4 x forward in hardware FLOPs) but MFU is quoted on the 3x model FLOPs.
- time at an MFU (model FLOPs utilisation over the GPU's dense bf16 datasheet peak) per variant,
  resolution, form and GPU (``default_mfu``): a MEASURED figure from ``MEASURED_MFU`` where one
  exists, else MODELLED from the per-op-type roofline of the model itself (``pipeline.roofline``:
  per-kernel FLOPs and minimum bytes of a bf16 train step, at the GPU's achievable matmul peak and
  bandwidth) times ``ROOFLINE_EFFICIENCY``; or the MFU the user gives. The plan says which.
- memory per GPU under ZeRO-3 (see ``zero3_memory``): partitioned model states (16 bytes/param / W:
  bf16 params 2 + bf16 grads 2 + fp32 master 4 + Adam m,v 8 - DeepSpeed 0.19's defaults for bf16,
  grad_accum_dtype = model dtype), parameters under the persistence threshold kept whole on every
  rank, the fp32 gradient copy DeepSpeed makes per optimizer sub-group during the step, gather /
  reduce buckets, a fixed CUDA/NCCL overhead, and activations MEASURED by running forward + backward
  of the actual variant on the meta device with ``torch.autograd.graph.saved_tensors_hooks``
  counting the bytes of every saved tensor's storage (the same bytes a CPU run saves, checked in
  tests/test_capacity.py); with activation checkpointing, composed from the same measurement: what stays
  saved outside checkpointed regions + each checkpointed block's input + the largest block's
  saved tensors (recomputed one block at a time in backward).
- the smallest GPU count that fits (with gradient accumulation when the micro-batch must shrink)
- the data rate the loaders and object storage must sustain (images/s, MB/s).

Everything is importable; ``jobs/capacity.py`` is a thin CLI over ``plan()`` / ``format_plan()``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional


import models
from pipeline.activations import ActivationModel, activation_model
from pipeline.roofline import OpRoofline, format_op_roofline, op_roofline

GiB = 1024**3
TPUV3_CORE_PEAK_FLOPS = 123e12 / 2  # TPUv3 chip: 123 TFLOP/s bf16 peak, 2 cores per chip


@dataclass(frozen=True)
class GPU:
    name: str
    peak_bf16_flops: float  # dense (no sparsity) bf16 tensor-core peak, FLOP/s
    memory_bytes: int  # total device memory as nvidia-smi reports it
    note: str = ""
    hbm_bytes_s: float = 0.0  # memory bandwidth, datasheet
    fp32_flops: float = 0.0  # non-tensor-core fp32 peak (depthwise convs run there), datasheet

    @property
    def matmul_flops(self) -> float:
        """Achievable bf16 matmul rate: the datasheet peak x MATMUL_EFFICIENCY."""
        return self.peak_bf16_flops * MATMUL_EFFICIENCY

    @property
    def bandwidth(self) -> float:
        """Achievable memory bandwidth: the datasheet's x BANDWIDTH_EFFICIENCY."""
        return self.hbm_bytes_s * BANDWIDTH_EFFICIENCY


# Measured on an H200 by ../shared/gpu (the kit's roofline): 790 of 989 TFLOP/s in a large bf16
# matmul, 4.3 of 4.8 TB/s in a copy; applied to every GPU until each is measured.
MATMUL_EFFICIENCY = 790 / 989
BANDWIDTH_EFFICIENCY = 4.3 / 4.8
# What a compiled step reaches of its roofline (the kit's "realistic compiled" assumption; timm's
# compiled inference on an RTX 4090 reaches 88-95% of this model's prediction; the goal is 90%).
ROOFLINE_EFFICIENCY = 0.80
ROOFLINE_BATCH = 128  # micro-batch for the modelled MFU when the plan has none (optimizer share)


# Dense bf16 peaks from NVIDIA's data sheets (the "with sparsity" figures are twice these).
GPUS: dict[str, GPU] = {
    g.name: g
    for g in [
        GPU("A100-40GB", 312e12, 40536 * 2**20, "p4d.24xlarge", 1555e9, 19.5e12),
        GPU("A100-80GB", 312e12, 81920 * 2**20, "p4de.24xlarge", 2039e9, 19.5e12),
        GPU("H100-SXM", 989e12, 81559 * 2**20, "p5.48xlarge", 3.35e12, 67e12),
        GPU("H100-PCIe", 756e12, 81559 * 2**20, "", 2.0e12, 51e12),
        GPU("H200", 989e12, 143771 * 2**20, "p5e/p5en.48xlarge", 4.8e12, 67e12),
        GPU("B200", 2250e12, 183359 * 2**20, "p6-b200.48xlarge", 8.0e12, 75e12),
        GPU("L40S", 362e12, 46068 * 2**20, "g6e", 864e9, 91.6e12),
        GPU("L4", 121e12, 23034 * 2**20, "g6", 300e9, 30.3e12),
        GPU("TPUv3-core", TPUV3_CORE_PEAK_FLOPS, 16 * GiB, "for comparison with the paper", 450e9,
            TPUV3_CORE_PEAK_FLOPS / 16),  # bandwidth: 900 GB/s per chip; vector rate a guess
    ]
}

# Dataset sizes (images per epoch). IN-21K as COATNET.md gives it; JFT sizes as the paper names them.
DATASETS: dict[str, int] = {
    "imagenet-1k": 1_281_167,
    "imagenet-21k": 12_700_000,
    "jft-300m": 300_000_000,
    "jft-3b": 3_000_000_000,
}

# The paper's reported pretraining compute (COATNET.md, JFT rows), TPUv3-core-days. All JFT-300M,
# 14 epochs at 224, batch 4096. (C-6/C-7 on JFT-3B are left out: their epochs are not in COATNET.md.)
PAPER_RUNS = [
    # (variant, dataset, epochs, img_size, batch, core_days, note)
    ("coatnet_3", "jft-300m", 14, 224, 4096, 580.0, "C-3 (dagger: strided DConv, = our default form)"),
    ("coatnet_4", "jft-300m", 14, 224, 4096, 950.0, "C-4"),
    ("coatnet_5", "jft-300m", 14, 224, 4096, 1820.0, "C-5"),
]


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO-3 knobs the memory model needs (defaults = infra/deepspeed/zero3_bf16.json)."""

    param_persistence_threshold: int = 100_000
    prefetch_bucket_size: int = 50_000_000
    reduce_bucket_size: int = 50_000_000
    sub_group_size: int = 1_000_000_000
    offload: str = "none"  # none | cpu (optimizer + params to host RAM) | nvme

    @classmethod
    def from_deepspeed_config(cls, cfg: dict, offload: Optional[str] = None) -> "ZeroSettings":
        z = cfg.get("zero_optimization", {})
        off = offload
        if off is None:
            dev = (z.get("offload_optimizer") or {}).get("device", "none")
            off = dev if dev in ("cpu", "nvme") else "none"
        return cls(
            param_persistence_threshold=int(z.get("stage3_param_persistence_threshold", 100_000)),
            prefetch_bucket_size=int(z.get("stage3_prefetch_bucket_size", 50_000_000)),
            reduce_bucket_size=int(z.get("reduce_bucket_size", 500_000_000)),
            sub_group_size=int(z.get("sub_group_size", 1_000_000_000)),
            offload=off,
        )


# --------------------------------------------------------------------------------------------
# Model facts: parameters, MACs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    variant: str
    img_size: int
    params: int
    persistent_params: int  # numel of parameters <= the ZeRO-3 persistence threshold (kept whole)
    largest_param: int
    macs_per_image: int  # multiply-accumulates, forward, batch 1 (models.count_flops)

    @property
    def forward_flops(self) -> int:
        return 2 * self.macs_per_image

    @property
    def train_flops(self) -> int:
        """Model FLOPs of one training step per image: forward + backward ~= 3 x forward."""
        return 3 * self.forward_flops


def count_macs(variant: str, img_size: int, device: str = "auto", architecture: tuple = ()) -> int:
    """MACs per image (batch 1) from the model's own counter, ``models.count_flops``.

    device="auto": on a meta-device model (no memory, no compute: CoAtNet-7's 2.4 B parameters
    would need ~10 GB of host RAM on CPU), falling back to a real CPU model if the counter cannot
    run on meta. tests/test_capacity.py checks that both devices give the same count."""
    import models

    if device == "auto":
        try:
            return count_macs(variant, img_size, "meta", architecture)
        except (RuntimeError, NotImplementedError, TypeError):
            device = "cpu"
    model = models.create_model(variant, img_size=img_size, device=device, **dict(architecture))
    return int(models.count_flops(model, img_size=img_size, batch_size=1))


@functools.lru_cache(maxsize=64)
def model_facts(variant: str, img_size: int, param_persistence_threshold: int = 100_000,
                architecture: tuple = ()) -> ModelFacts:
    """``architecture``: ``ModelConfig.architecture()`` items (preset, form fields), as a tuple."""
    model = models.create_model(variant, img_size=img_size, device="meta", **dict(architecture))
    numels = [p.numel() for p in model.parameters()]
    return ModelFacts(
        variant=variant,
        img_size=img_size,
        params=sum(numels),
        persistent_params=sum(n for n in numels if n <= param_persistence_threshold),
        largest_param=max(numels),
        macs_per_image=count_macs(variant, img_size, architecture=architecture),
    )


# --------------------------------------------------------------------------------------------
# MFU: measured where measured, else modelled from the roofline
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredMFU:
    mfu: float  # of the GPU's datasheet dense bf16 peak (GPUS[gpu].peak_bf16_flops)
    images_per_s: float  # per GPU, the production step (DeepSpeed ZeRO-3, bf16)
    source: str  # where the figure is recorded: benchmarks/RESULTS.md section, device, torch, date


# (variant, img_size, gpu, architecture) -> MeasuredMFU; architecture as PlanInputs.architecture
# (() = the timm form). Filled from benchmarks/RESULTS.md (benchmarks/model_step.py,
# benchmarks/zero3_step.py on the GPU); none measured yet.
MEASURED_MFU: dict[tuple[str, int, str, tuple], MeasuredMFU] = {}


@dataclass(frozen=True)
class MFU:
    value: float  # of the datasheet dense bf16 peak
    source: str  # "measured" | "modelled" | "given"
    note: str
    ceiling: Optional[float] = None  # the roofline's MFU ceiling (modelled) at this batch
    ceiling_images_per_s: Optional[float] = None  # per GPU


def roofline_for(variant: str, img_size: int, architecture: tuple = ()) -> OpRoofline:
    return op_roofline(variant, img_size, architecture)


def modelled_mfu(variant: str, img_size: int, gpu: str, architecture: tuple = (),
                 batch: int = ROOFLINE_BATCH, shards: int = 1) -> MFU:
    """ROOFLINE_EFFICIENCY x the MFU ceiling of the model's per-op-type roofline on ``gpu`` at
    micro-batch ``batch``; ``shards`` = ZeRO-3 ranks x accumulation steps (the optimizer's share)."""
    g = GPUS[gpu]
    rl = roofline_for(variant, img_size, architecture)
    args = (batch, g.matmul_flops, g.fp32_flops, g.bandwidth)
    ceiling = rl.mfu(*args, peak=g.peak_bf16_flops, shards=shards)
    img_s = rl.images_per_s(*args, shards=shards)
    return MFU(ceiling * ROOFLINE_EFFICIENCY, "modelled",
               f"{ROOFLINE_EFFICIENCY:.0%} of the roofline ceiling {ceiling:.1%} "
               f"({img_s:,.0f} img/s per GPU at micro-batch {batch})", ceiling, img_s)


def default_mfu(variant: str, img_size: int, gpu: str, architecture: tuple = (),
                batch: int = ROOFLINE_BATCH, measured: Optional[dict] = None, shards: int = 1) -> MFU:
    """The measured MFU for (variant, img_size, gpu, architecture) when ``measured`` (default
    ``MEASURED_MFU``) has it, else the modelled one."""
    table = MEASURED_MFU if measured is None else measured
    hit = table.get((variant, img_size, gpu, tuple(architecture)))
    model = modelled_mfu(variant, img_size, gpu, architecture, batch, shards)
    if hit is None:
        return model
    return MFU(hit.mfu, "measured", f"{hit.images_per_s:,.0f} img/s per GPU, {hit.source}",
               model.ceiling, model.ceiling_images_per_s)


# --------------------------------------------------------------------------------------------
# ZeRO-3 memory model
# --------------------------------------------------------------------------------------------

CUDA_OVERHEAD_BYTES = 2 * GiB  # CUDA context + cuBLAS/cuDNN workspaces + NCCL buffers (assumption)
DEFAULT_HEADROOM = 0.10  # fraction of device memory left for allocator fragmentation


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU (and per node in host RAM / NVMe when offloading)."""

    params: float  # bf16 partition + persistent (unpartitioned) small params
    grads: float  # bf16 gradient partition
    master: float  # fp32 master weights
    optimizer: float  # Adam m and v, fp32
    step_transient: float  # fp32 gradient copy of one optimizer sub-group during the step
    buffers: float  # all-gather prefetch + largest gathered param + reduce bucket (bf16)
    activations: float
    overhead: float
    host_per_node: float = 0.0  # pinned host RAM used by offload, per node
    nvme_per_node: float = 0.0

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.master + self.optimizer

    @property
    def total(self) -> float:
        return (self.model_states + self.step_transient + self.buffers + self.activations
                + self.overhead)


def zero3_model_states(params: int, persistent_params: int, world_size: int) -> dict[str, float]:
    """Resident ZeRO-3 model-state bytes per rank, no offload (bf16 + fp32 master + AdamW):
    2 + 2 + 4 + 8 = 16 bytes per parameter / world size, plus the bf16 copies of the
    parameters under the persistence threshold, which every rank keeps whole."""
    part = math.ceil(params / world_size)
    return {
        "params": 2 * part + 2 * persistent_params,
        "grads": 2 * part,
        "master": 4 * part,
        "optimizer": 8 * part,
    }


def zero3_memory(facts: ModelFacts, world_size: int, micro_batch: int, act: ActivationModel,
                 zero: ZeroSettings = ZeroSettings(), checkpointing: bool = False,
                 gpus_per_node: int = 8) -> MemoryBreakdown:
    st = zero3_model_states(facts.params, facts.persistent_params, world_size)
    part = math.ceil(facts.params / world_size)
    transient = 4 * min(part, zero.sub_group_size)
    buffers = 2 * (zero.prefetch_bucket_size + facts.largest_param + zero.reduce_bucket_size)
    activations = act.bytes(micro_batch, checkpointing)
    host = nvme = 0.0
    if zero.offload == "none":
        return MemoryBreakdown(st["params"], st["grads"], st["master"], st["optimizer"], transient,
                               buffers, activations, CUDA_OVERHEAD_BYTES)
    # Offload: fp32 master + Adam states (and the step's fp32 grads) live off the GPU, the bf16
    # gradient partition is copied out as it is reduced, the bf16 parameter partitions live off
    # the GPU too (offload_param); only persistent small params stay resident.
    gpu_params = 2 * facts.persistent_params
    off = (st["master"] + st["optimizer"] + st["grads"] + 2 * part + transient) * gpus_per_node
    if zero.offload == "cpu":
        host = off
    else:  # nvme: states on NVMe, pinned swap buffers in host RAM (~ a few sub-groups)
        nvme = off
        host = (4 * min(part, zero.sub_group_size) * 4) * gpus_per_node
    return MemoryBreakdown(gpu_params, 0.0, 0.0, 0.0, 0.0, buffers, activations,
                           CUDA_OVERHEAD_BYTES, host_per_node=host, nvme_per_node=nvme)


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanInputs:
    variant: str = "coatnet_3"
    img_size: int = 224
    dataset_size: int = DATASETS["jft-300m"]
    epochs: float = 14
    global_batch: int = 4096
    gpu: str = "H100-SXM"
    num_gpus: int = 64
    gpus_per_node: int = 8
    mfu: Optional[float] = None  # None: default_mfu (measured, else modelled)
    checkpointing: bool = False
    offload: str = "none"
    bytes_per_image: float = 110e3  # average encoded bytes per sample in the shards
    # JPEG decode + RandomResizedCrop + flip + normalise, images/s on one CPU core: measured here
    # (PIL, 500x375 JPEG of 71 KB, torchvision v2, 1 thread); RandAugment lowers it.
    decode_images_per_core_s: float = 300.0
    min_micro_batch: int = 8  # BatchNorm in the MBConv stages wants a few images per rank
    headroom: float = DEFAULT_HEADROOM
    # the network's form: ModelConfig.architecture() items, e.g. (("preset", "paper"),); () = timm's
    architecture: tuple = ()
    usd_per_gpu_hour: Optional[float] = None


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    facts: ModelFacts
    total_flops: float
    seconds: float
    gpu_hours: float
    micro_batch: Optional[int]  # None: does not fit at num_gpus
    grad_accum: Optional[int]
    memory: MemoryBreakdown
    fits: bool
    min_gpus: Optional[int]  # smallest count (1, 2, 4, then multiples of gpus_per_node) that fits
    images_per_s: float
    mfu: MFU
    mb_per_s: float
    decode_cores: float  # CPU cores the loaders need for decode + augmentation, cluster-wide
    cost_usd: Optional[float]


def _usable(gpu: GPU, headroom: float) -> float:
    return gpu.memory_bytes * (1.0 - headroom)


def choose_micro_batch(facts: ModelFacts, act: ActivationModel, inp: PlanInputs, n: int,
                       zero: ZeroSettings) -> tuple[Optional[int], MemoryBreakdown]:
    """Largest per-GPU micro-batch dividing global_batch / n that fits (gradient accumulation
    makes up the rest); None when even min_micro_batch does not fit or n does not divide it."""
    gpu = GPUS[inp.gpu]
    per_rank = inp.global_batch // n if inp.global_batch % n == 0 else 0
    if per_rank == 0:
        return None, zero3_memory(facts, n, 1, act, zero, inp.checkpointing, inp.gpus_per_node)
    best = None
    for m in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        if m < min(inp.min_micro_batch, per_rank):
            break
        mem = zero3_memory(facts, n, m, act, zero, inp.checkpointing, inp.gpus_per_node)
        if mem.total <= _usable(gpu, inp.headroom):
            return m, mem
        best = mem
    if best is None:
        best = zero3_memory(facts, n, per_rank, act, zero, inp.checkpointing, inp.gpus_per_node)
    return None, best


def gpu_counts(gpus_per_node: int, limit: int = 65536) -> list[int]:
    counts = [c for c in (1, 2, 4) if c < gpus_per_node]
    n = gpus_per_node
    while n <= limit:
        counts.append(n)
        n += gpus_per_node if n < 16 * gpus_per_node else n // 4
    return counts


def plan(inp: PlanInputs, zero: Optional[ZeroSettings] = None) -> Plan:
    if inp.gpu not in GPUS:
        raise ValueError(f"unknown GPU {inp.gpu!r}; known: {', '.join(GPUS)}")
    if inp.mfu is not None and not 0 < inp.mfu <= 1:
        raise ValueError("mfu must be in (0, 1]")
    zero = zero or ZeroSettings(offload=inp.offload)
    if zero.offload != inp.offload:
        zero = dataclasses.replace(zero, offload=inp.offload)
    facts = model_facts(inp.variant, inp.img_size, zero.param_persistence_threshold, inp.architecture)
    act = activation_model(inp.variant, inp.img_size, architecture=inp.architecture)
    gpu = GPUS[inp.gpu]

    images = inp.dataset_size * inp.epochs
    total_flops = facts.train_flops * images
    micro, mem = choose_micro_batch(facts, act, inp, inp.num_gpus, zero)
    if inp.mfu is None:
        accum = inp.global_batch // inp.num_gpus // micro if micro else 1
        mfu = default_mfu(inp.variant, inp.img_size, inp.gpu, inp.architecture, micro or ROOFLINE_BATCH,
                          shards=inp.num_gpus * accum)
    else:
        mfu = MFU(inp.mfu, "given", "--mfu")
    seconds = total_flops / (inp.num_gpus * gpu.peak_bf16_flops * mfu.value)
    min_gpus = None
    for n in gpu_counts(inp.gpus_per_node):
        if choose_micro_batch(facts, act, inp, n, zero)[0] is not None:
            min_gpus = n
            break
    images_per_s = inp.num_gpus * gpu.peak_bf16_flops * mfu.value / facts.train_flops
    gpu_hours = seconds * inp.num_gpus / 3600
    return Plan(
        inputs=inp, facts=facts, total_flops=total_flops, seconds=seconds, gpu_hours=gpu_hours,
        micro_batch=micro,
        grad_accum=(inp.global_batch // inp.num_gpus // micro) if micro else None,
        memory=mem, fits=micro is not None, min_gpus=min_gpus,
        images_per_s=images_per_s, mfu=mfu, mb_per_s=images_per_s * inp.bytes_per_image / 1e6,
        decode_cores=images_per_s / inp.decode_images_per_core_s,
        cost_usd=gpu_hours * inp.usd_per_gpu_hour if inp.usd_per_gpu_hour else None,
    )


# --------------------------------------------------------------------------------------------
# The paper's compute, for comparison
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperCheck:
    variant: str
    note: str
    macs_per_image: int
    total_flops: float
    paper_core_days: float
    core_days_at_100pct: float  # what our FLOP count needs on TPUv3 cores at peak
    implied_mfu: float  # our FLOPs / (the paper's core-days x core peak)


def paper_check() -> list[PaperCheck]:
    """Our FLOP count for the paper's JFT pretraining runs vs the TPUv3-core-days it reports.
    Assumptions: a TPUv3 core peaks at 61.5 TFLOP/s bf16 (123 per chip, 2 cores); the reported
    core-days cover the 14-epoch JFT-300M pretraining at 224 only; 300M images per epoch."""
    rows = []
    for variant, ds, epochs, img, _batch, core_days, note in PAPER_RUNS:
        facts = model_facts(variant, img)
        total = facts.train_flops * DATASETS[ds] * epochs
        at_peak = total / TPUV3_CORE_PEAK_FLOPS / 86400
        rows.append(PaperCheck(variant, note, facts.macs_per_image, total, core_days, at_peak,
                               at_peak / core_days))
    return rows


# --------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    if 0 < x < GiB:
        return f"{x / 2**20:,.1f} MiB"
    return f"{x / GiB:,.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:,.1f} days"
    return f"{seconds / 3600:,.1f} h"


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def format_plan(p: Plan) -> str:
    i, f, m = p.inputs, p.facts, p.memory
    gpu = GPUS[i.gpu]
    compute = [
        ("model", f"{i.variant} @ {i.img_size}px ({dict(i.architecture).get('preset', 'timm')} form): "
                  f"{f.params / 1e6:,.1f} M params"),
        ("forward MACs / image", f"{f.macs_per_image / 1e9:,.2f} G (models.count_flops)"),
        ("forward FLOPs / image", f"{f.forward_flops / 1e9:,.2f} G  (= 2 x MACs)"),
        ("train FLOPs / image", f"{f.train_flops / 1e9:,.2f} G  (= 3 x forward)"),
        ("images", f"{i.dataset_size:,} x {i.epochs:g} epochs = {i.dataset_size * i.epochs:,.0f}"),
        ("total compute", f"{p.total_flops:.3e} FLOPs"),
        ("GPU", f"{i.num_gpus} x {gpu.name} ({gpu.peak_bf16_flops / 1e12:,.0f} TFLOP/s bf16 dense)"),
        ("MFU", f"{p.mfu.value:.1%} {p.mfu.source}: {p.mfu.note}"),
        ("time", f"{_duration(p.seconds)} at {p.mfu.value:.1%} MFU ({p.mfu.source})"
                 f"  ({p.gpu_hours:,.0f} GPU-hours)"),
    ]
    if p.cost_usd is not None:
        compute.append(("cost", f"${p.cost_usd:,.0f} at ${i.usd_per_gpu_hour:.2f}/GPU-hour"))
    mem = [
        ("ZeRO-3 offload", i.offload + ("  + activation checkpointing" if i.checkpointing else "")),
        ("micro-batch / GPU", f"{p.micro_batch} x {p.grad_accum} accumulation steps"
         if p.fits else f"does not fit (global batch {i.global_batch} over {i.num_gpus} GPUs)"),
        ("bf16 params", _gib(m.params)),
        ("bf16 grads", _gib(m.grads)),
        ("fp32 master", _gib(m.master)),
        ("Adam m, v (fp32)", _gib(m.optimizer)),
        ("step: fp32 grad copy", _gib(m.step_transient)),
        ("gather/reduce buffers", _gib(m.buffers)),
        ("activations (measured)", _gib(m.activations)),
        ("CUDA/NCCL overhead", _gib(m.overhead)),
        ("total per GPU", f"{_gib(m.total)} of {_gib(gpu.memory_bytes)}"
         f" ({_gib(_usable(gpu, i.headroom))} usable)"),
    ]
    if m.host_per_node:
        mem.append(("host RAM per node", _gib(m.host_per_node)))
    if m.nvme_per_node:
        mem.append(("NVMe per node", _gib(m.nvme_per_node)))
    mem.append(("smallest GPU count", str(p.min_gpus) if p.min_gpus else "none up to 65536"))
    data = [
        ("images / s (cluster)", f"{p.images_per_s:,.0f}  ({p.images_per_s / i.num_gpus:,.1f} per GPU)"),
        ("read rate", f"{p.mb_per_s:,.0f} MB/s at {i.bytes_per_image / 1e3:,.0f} KB/image"
         f"  ({p.mb_per_s / max(1, i.num_gpus // i.gpus_per_node):,.0f} MB/s per node)"),
        ("decode + augment", f"{p.decode_cores:,.0f} CPU cores ({p.decode_cores / i.num_gpus:,.1f} per GPU)"
         f" at {i.decode_images_per_core_s:,.0f} images/s/core"),
    ]
    return "\n".join(["Compute", _table(compute), "", "Memory per GPU (ZeRO-3, bf16, AdamW)",
                      _table(mem), "", "Data rate the loaders and storage must sustain",
                      _table(data)])


def format_roofline(p: Plan) -> str:
    """The plan's roofline: one train step's kernels by op type and by stage on its GPU."""
    i, g = p.inputs, GPUS[p.inputs.gpu]
    batch = p.micro_batch or ROOFLINE_BATCH
    rl = roofline_for(i.variant, i.img_size, i.architecture)
    return format_op_roofline(rl, batch, g.matmul_flops, g.fp32_flops, g.bandwidth, g.peak_bf16_flops,
                              g.name)


def format_paper_check(rows: list[PaperCheck]) -> str:
    head = (f"  {'run':<10} {'MACs/img':>10} {'train FLOPs':>12} {'paper':>12} "
            f"{'ours @100%':>12} {'implied MFU':>12}")
    lines = ["The paper's JFT-300M pretraining (14 epochs @ 224) vs our FLOP count",
             "(TPUv3 core = 61.5 TFLOP/s bf16 peak; core-days)", head]
    for r in rows:
        lines.append(f"  {r.variant:<10} {r.macs_per_image / 1e9:>9.2f}G {r.total_flops:>12.3e} "
                     f"{r.paper_core_days:>12,.0f} {r.core_days_at_100pct:>12,.0f} "
                     f"{r.implied_mfu:>12.1%}")
    return "\n".join(lines)
