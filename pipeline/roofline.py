"""A per-op-type roofline of one bf16 training step, read from the model itself.

One training-mode forward pass of the actual network (variant, resolution, form) runs on the
``meta`` device (shapes only: CoAtNet-7 at 512 px costs no memory) under a ``TorchDispatchMode``
that sees every aten op with the module it runs in. FLOPs come from PyTorch's own FLOP formulas
(``torch.utils.flop_counter.flop_registry``, the counter behind ``models.count_flops``); the
minimum bytes are what each KERNEL must read and write once, bf16 activations (2 bytes), after
the fusion a compiled step can reach:

- GEMM-like ops (1x1 conv, linear, the stem's dense 3x3 convs) and depthwise convs are kernels of
  their own (cuDNN/cuBLAS calls: no fused prologues or epilogues): read the activation input, write
  the output; weights are counted once per micro-batch (bf16 gathered, written and read, bf16
  gradients: 16 bytes per parameter) and the optimizer once per global batch on its ZeRO-3
  partition (fp32 master + Adam m, v read and written: 24 bytes per parameter / ranks): 40 on one GPU.
- A norm is one kernel: BatchNorm reads its input twice (statistics, apply) and writes once in
  forward, 5 passes in backward; LayerNorm 2 and 3. Pointwise ops that directly follow it (GELU,
  casts) are fused into it.
- Any other run of pointwise ops (a residual add with drop path, the MLP's GELU) is one kernel:
  it reads each large input once and writes its last output; backward reads dy and writes one
  gradient per input, and also reads the input of a non-linear op.
- Squeeze-excitation: its mean is fused into the preceding norm, its 1x1 convs are tiny, the
  scale multiply reads and writes the map (backward 4 passes: a reduction, then the apply).
- Attention (the region of a ``RelativeAttention`` outside its qkv/proj linears) is one fused
  kernel: q, k, v read, o and the fp32 log-sum-exp written in forward; in backward q, k, v, o, dO
  read, dq, dk, dv written, plus the delta pre-pass (2.5 x the forward's tensors) at 2.5 x its
  FLOPs in hardware FLOPs. The bias table is small and not counted (FlexAttention reads it
  through the index; SDPA's dense bias and its N x N gradient would add more).
- Pooling reads its input and writes its output, in both directions.
- Views, layout copies and dtype casts are free (a compiled step folds them into its kernels);
  tensors under ``WALK_BATCH x 2048`` elements (SE vectors, drop-path masks) are not counted.

Backward of a GEMM costs 2 x its forward FLOPs (data and weight gradients; 1 x for the stem's
first conv, whose input needs no gradient) and reads dy and x, writes dx. Each kernel's time is
max(hardware FLOPs / peak, bytes / bandwidth) (depthwise convs on the CUDA cores' fp32 peak); the
step's time is their sum plus the optimizer's traffic. The MFU ceiling is the model FLOPs
(6 x ``models.count_flops`` MACs, as the planner quotes MFU) over that time and the datasheet peak.

    rl = op_roofline("coatnet_3", 224)                 # per image, by kernel
    t = rl.step_seconds(batch=128, matmul_flops=790e12, fp32_flops=67e12, bandwidth=4.3e12)
    rl.by_type(...)                                    # per op type: GFLOP, MB, time share

This reproduces ``../shared/gpu/roofline.py`` (an analytic model written per layer) from the
model's own ops; ``tests/test_roofline.py`` holds the two within a stated tolerance.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import models

E = 2  # bytes per bf16 activation element
# Per parameter and step: fp32 master + Adam m, v read and written (24 bytes; under ZeRO-3 each rank
# steps its 1/world partition once per global batch) and bf16 weights gathered, written and read in
# forward and backward, bf16 gradients written and read (16 bytes, every micro-batch): 40 on one GPU.
OPTIMIZER_BYTES_PER_PARAM = 40
WEIGHT_BYTES_PER_PARAM = 16
WALK_BATCH = 2

GEMM, DEPTHWISE, STEM, NORM, ATTENTION, SE, OTHER = (
    "1x1 conv / linear", "depthwise conv", "dense kxk conv", "norm+act", "attention", "SE",
    "residual/pool/other")
OP_TYPES = (GEMM, DEPTHWISE, STEM, NORM, ATTENTION, SE, OTHER)

_VIEWS = {"view", "_unsafe_view", "permute", "t", "transpose", "expand", "unbind", "reshape", "detach",
          "clone", "_to_copy", "alias", "squeeze", "unsqueeze", "slice", "select", "split", "contiguous"}
_NONLINEAR = {"gelu", "silu", "sigmoid", "tanh", "relu", "_softmax"}
_POOLS = {"avg_pool2d", "max_pool2d", "max_pool2d_with_indices", "adaptive_avg_pool2d"}


@dataclass
class Kernel:
    """One kernel of the forward pass and what its backward costs, per WALK_BATCH images."""

    op_type: str
    stage: str
    flops_fw: float = 0.0
    flops_bw: float = 0.0
    hw_flops_bw: float = 0.0
    bytes_fw: float = 0.0
    bytes_bw: float = 0.0
    reads: dict = field(default_factory=dict)   # pointwise runs: id -> numel of each large input
    out: int = 0
    saved: int = 0
    open: bool = False                          # a pointwise op may still join it

    def seal(self) -> None:
        if self.op_type in (OTHER, NORM) and self.reads:     # a run of pointwise ops
            inputs = sum(self.reads.values())
            self.bytes_fw = E * (inputs + self.out)
            self.bytes_bw = E * (self.out + inputs + self.saved)
            self.reads = {}
        self.open = False


@dataclass(frozen=True)
class OpRoofline:
    """The kernels of one training step of a network, per image."""

    variant: str
    img_size: int
    params: int
    model_flops: float  # per image: 6 x models.count_flops MACs
    kernels: tuple      # (op_type, stage, flops, hw_flops, bytes), per image, fwd + bwd

    def _time(self, k, matmul_flops: float, fp32_flops: float, bandwidth: float) -> float:
        peak = fp32_flops if k[0] == DEPTHWISE else matmul_flops
        return max(k[3] / peak, k[4] / bandwidth)

    def optimizer_bytes(self, shards: int = 1) -> float:
        """Weight and optimizer traffic of one micro-batch; ``shards`` = ZeRO-3 world size x
        gradient accumulation steps (the optimizer's share per micro-batch and rank)."""
        opt = OPTIMIZER_BYTES_PER_PARAM - WEIGHT_BYTES_PER_PARAM
        return self.params * (WEIGHT_BYTES_PER_PARAM + opt / shards)

    def step_seconds(self, batch: int, matmul_flops: float, fp32_flops: float, bandwidth: float,
                     shards: int = 1) -> float:
        """Roofline time of one step of ``batch`` images: kernels + the weights' and optimizer's traffic."""
        per_image = sum(self._time(k, matmul_flops, fp32_flops, bandwidth) for k in self.kernels)
        return batch * per_image + self.optimizer_bytes(shards) / bandwidth

    def images_per_s(self, batch: int, matmul_flops: float, fp32_flops: float, bandwidth: float,
                     shards: int = 1) -> float:
        return batch / self.step_seconds(batch, matmul_flops, fp32_flops, bandwidth, shards)

    def mfu(self, batch: int, matmul_flops: float, fp32_flops: float, bandwidth: float,
            peak: float, shards: int = 1) -> float:
        """The MFU ceiling: model FLOPs per second at the roofline over ``peak``."""
        return self.images_per_s(batch, matmul_flops, fp32_flops, bandwidth, shards) * self.model_flops / peak

    @property
    def bytes_per_image(self) -> float:
        return sum(k[4] for k in self.kernels)

    def by(self, key: str, matmul_flops: float, fp32_flops: float, bandwidth: float) -> dict:
        """{op type or stage: (model GFLOP, MB, seconds per image at the roofline)}."""
        out: dict = defaultdict(lambda: [0.0, 0.0, 0.0])
        for k in self.kernels:
            row = out[k[0] if key == "type" else k[1]]
            row[0] += k[2] / 1e9
            row[1] += k[4] / 1e6
            row[2] += self._time(k, matmul_flops, fp32_flops, bandwidth)
        return dict(out)


class _Walker(TorchDispatchMode):
    def __init__(self, stack: list, params: set):
        super().__init__()
        self.stack, self.params = stack, params
        self.kernels: list[Kernel] = []
        self.producer: dict[int, object] = {}     # id(tensor) -> Kernel | "input"
        self.keep: list = []                      # ids stay unique while the walk runs
        self.large = 0

    def _stage(self) -> str:
        return next((s for s in reversed(self.stack) if isinstance(s, str)), "stem")

    def _in(self, cls) -> bool:
        return any(isinstance(m, cls) for m in self.stack if not isinstance(m, str))

    def _attention_region(self) -> bool:
        mods = [m for m in self.stack if not isinstance(m, str)]
        return bool(mods) and isinstance(mods[-1], models.coatnet.RelativeAttention)

    def _open(self) -> Kernel | None:
        k = self.kernels[-1] if self.kernels else None
        return k if k is not None and k.open else None

    def _close(self) -> None:
        if self.kernels and self.kernels[-1].open:
            self.kernels[-1].seal()

    def _new(self, op_type: str, **kw) -> Kernel:
        self._close()
        k = Kernel(op_type, self._stage(), **kw)
        self.kernels.append(k)
        return k

    def _acts(self, args) -> list[torch.Tensor]:
        return [a for a in args if isinstance(a, torch.Tensor)
                and a.untyped_storage()._cdata not in self.params]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        self.keep.extend(outs)
        ins = [a for a in args if isinstance(a, torch.Tensor)]
        if name in _VIEWS:
            src = self.producer.get(id(ins[0])) if ins else None
            for o in outs:
                if src is not None:
                    self.producer[id(o)] = src
            return out
        flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out) \
            if func.overloadpacket in flop_registry else 0
        acts = self._acts(args)
        if self._attention_region():
            self._attention(name, flops, args, out)
        elif name in ("convolution", "addmm", "mm", "bmm"):
            self._gemm(name, flops, args, acts, outs[0])
        elif name in ("native_batch_norm", "native_layer_norm", "_native_batch_norm_legit"):
            n = acts[0].numel()
            bn = name != "native_layer_norm"
            k = self._new(NORM, bytes_fw=E * (3 if bn else 2) * n, bytes_bw=E * (5 if bn else 3) * n, open=True)
            k.out = n
            self.producer[id(outs[0])] = k
        elif name in _POOLS or (name == "mean" and not self._in(models.coatnet.SqueezeExcite)):
            n_in, n_out = acts[0].numel(), outs[0].numel()
            k = self._new(OTHER, bytes_fw=E * (n_in + n_out), bytes_bw=E * (n_in + n_out))
            for o in outs:
                self.producer[id(o)] = k
        elif name == "mean":                      # SE squeeze: fused into the preceding norm
            self._close()
        elif outs and outs[0].is_floating_point():
            self._pointwise(name, acts, outs[0])
        return out

    def _gemm(self, name, flops, args, acts, out) -> None:
        se = self._in(models.coatnet.SqueezeExcite)
        x = acts[0]
        kind = SE if se else GEMM
        if name == "convolution":
            weight, groups = args[1], args[8]
            if groups > 1:
                kind = DEPTHWISE
            elif weight.shape[-1] * weight.shape[-2] > 1 and not se:
                kind = STEM
        dgrad = self.producer.get(id(x)) != "input"
        n_in, n_out = (0, 0) if se else (x.numel(), out.numel())
        if kind == DEPTHWISE:
            k = self._new(kind, flops_fw=flops, flops_bw=2 * flops, bytes_fw=E * (n_in + n_out),
                          bytes_bw=2 * E * (n_in + n_out))
        else:
            k = self._new(kind, flops_fw=flops, flops_bw=(2 if dgrad else 1) * flops,
                          bytes_fw=E * (n_in + n_out),
                          bytes_bw=E * ((2 * n_out + 2 * n_in) if dgrad else (n_out + n_in)))
        k.hw_flops_bw = k.flops_bw
        self.producer[id(out)] = k

    def _attention(self, name, flops, args, out) -> None:
        k = self._open()
        if k is None or k.op_type != ATTENTION:
            k = self._new(ATTENTION, open=True)
        if name == "bmm":
            a, b = args[0], args[1]
            if k.flops_fw == 0:                   # q @ k^T: q and k read; the lse per row written
                tokens = E * (a.numel() + b.numel()) + 4 * out.shape[0] * out.shape[1]
            else:                                 # p @ v: v read, o written
                tokens = E * (b.numel() + out.numel())
            k.bytes_fw += tokens
            k.bytes_bw += 2.5 * tokens
            k.flops_fw += flops
            k.flops_bw += 2 * flops
            k.hw_flops_bw += 2.5 * flops
        self.producer[id(out)] = k

    def _pointwise(self, name, acts, out) -> None:
        large = [a for a in acts if a.numel() >= self.large]
        if out.numel() < self.large or not large:
            return
        if self._in(models.coatnet.SqueezeExcite):          # the scale multiply
            n = max(a.numel() for a in large)
            k = self._new(SE, bytes_fw=2 * E * n, bytes_bw=4 * E * n)
            self.producer[id(out)] = k
            return
        k = self._open()
        if k is None or not any(self.producer.get(id(a)) is k for a in large):
            k = self._new(NORM if name in _NONLINEAR else OTHER, open=True)
            if k.op_type == NORM:
                k.reads, k.out = {}, 0
        fresh = [a for a in large if self.producer.get(id(a)) is not k]
        if k.op_type == NORM and k.bytes_fw:                 # act fused into a norm: no new traffic
            fresh = []
        for a in fresh:
            k.reads[id(a)] = a.numel()
            if name in _NONLINEAR:
                k.saved += a.numel()
        if not (k.op_type == NORM and k.bytes_fw):
            k.out = out.numel()
        self.producer[id(out)] = k


def _walk(model: torch.nn.Module, img_size: int) -> list[Kernel]:
    stack: list = []
    handles = []
    names = {m: n for n, m in model.named_modules()}
    for mod in model.modules():
        label = names[mod]
        if label.count(".") == 1 and label.startswith("stages."):
            label = f"S{int(label.split('.')[1]) + 1}"
        elif label in ("stem", "head"):
            label = {"stem": "S0", "head": "head"}[label]
        else:
            label = None

        def pre(m, a, _label=label):
            stack.append(m)
            if _label:
                stack.append(_label)

        def post(m, a, o, _label=label):
            if _label:
                stack.pop()
            stack.pop()
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    walker = _Walker(stack, params)
    x = torch.zeros(WALK_BATCH, 3, img_size, img_size, device="meta")
    walker.producer[id(x)] = "input"
    walker.large = WALK_BATCH * 2048
    try:
        with walker:
            model(x)
        walker._close()
    finally:
        for h in handles:
            h.remove()
    for k in walker.kernels:
        if k.reads:
            k.seal()
    return walker.kernels


@functools.lru_cache(maxsize=64)
def op_roofline(variant: str, img_size: int, architecture: tuple = ()) -> OpRoofline:
    """The roofline kernels of ``variant`` at ``img_size`` (``architecture``: ModelConfig items)."""
    arch = {**dict(architecture), "attn_backend": "math"}
    model = models.create_model(variant, img_size=img_size, device="meta", **arch).train()
    kernels = _walk(model, img_size)
    macs = models.count_flops(model, img_size=img_size)
    rows = tuple((k.op_type, k.stage, (k.flops_fw + k.flops_bw) / WALK_BATCH,
                  (k.flops_fw + k.hw_flops_bw) / WALK_BATCH, (k.bytes_fw + k.bytes_bw) / WALK_BATCH)
                 for k in kernels if k.flops_fw or k.bytes_fw)
    return OpRoofline(variant, img_size, sum(p.numel() for p in model.parameters()), 6.0 * macs, rows)


def format_op_roofline(rl: OpRoofline, batch: int, matmul_flops: float, fp32_flops: float,
                       bandwidth: float, peak: float, device: str = "") -> str:
    """A markdown table of ``rl`` by op type, then by stage (model GFLOP and MB per image,
    FLOP/byte, the share of the roofline time), and the ceiling (modelled)."""
    args = (matmul_flops, fp32_flops, bandwidth)
    total = rl.step_seconds(batch, *args)
    lines = [f"Roofline (modelled) of {rl.variant} @ {rl.img_size}px, one bf16 train step, batch {batch}"
             f"{', ' + device if device else ''}: {matmul_flops / 1e12:,.0f} TFLOP/s matmul, "
             f"{bandwidth / 1e12:,.2f} TB/s",
             "| op type / stage | GFLOP/img | MB/img | FLOP/B | % time |", "|---|---|---|---|---|"]
    for key in ("type", "stage"):
        for name, (gf, mb, s) in sorted(rl.by(key, *args).items(), key=lambda kv: -kv[1][2]):
            inten = f"{gf * 1e3 / mb:,.0f}" if mb else "-"
            lines.append(f"| {name} | {gf:,.3f} | {mb:,.1f} | {inten} | {100 * s * batch / total:.1f} |")
    opt = rl.optimizer_bytes() / bandwidth
    lines.append(f"| optimizer + weights (one GPU) | - | {rl.optimizer_bytes() / 1e6:,.0f}/step | - | "
                 f"{100 * opt / total:.1f} |")
    lines.append(f"ceiling: {rl.images_per_s(batch, *args):,.0f} img/s, MFU {rl.mfu(batch, *args, peak=peak):.1%}"
                 f" of {peak / 1e12:,.0f} TFLOP/s ({rl.model_flops / 1e9:,.2f} model GFLOP/img, "
                 f"{rl.bytes_per_image / 1e6:,.0f} MB/img)")
    return "\n".join(lines)
