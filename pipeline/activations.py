"""Activation memory of a network, measured rather than estimated: one forward + backward with
``torch.autograd.graph.saved_tensors_hooks`` counting the bytes of every storage autograd saves for
backward (parameters excluded: ZeRO-3 accounts for those), on the ``meta`` device (shapes only, so
even CoAtNet-7 costs no memory) or on CPU with the same result. With activation checkpointing the
peak is composed from the same measurement: what stays saved outside checkpointed regions + each
checkpointed block's input + the largest block's saved tensors (recomputed one block at a time).

    act = activation_model("coatnet_3", 224)        # bytes = fixed + per_image x micro_batch
    act.bytes(micro_batch=32, checkpointing=True)

The planner measures each variant on a copy with two blocks per stage and adds the repeated blocks'
figures (``measure_repeats_once``), which equals measuring the whole network and costs a fraction
of the meta-device work (coatnet_7: 10 of 46 blocks).

The capacity planner (``pipeline.capacity``) builds its memory per GPU on this.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Iterable

import torch

import models


class _Packed:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorMeter:
    """Counts the bytes autograd keeps for backward: every tensor packed by a saved-tensor hook,
    deduplicated by storage, minus parameters (ZeRO-3 accounts for those separately). Tracks the
    live total (a storage is freed when the last node saving it is released in backward) and its
    peak. Works on the meta device (shapes only) and on CPU with the same result."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage()._cdata for t in exclude}
        self._refs: dict[int, list[int]] = {}
        self.live = 0
        self.peak = 0

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._exclude:
            return t
        entry = self._refs.get(key)
        if entry is None:
            self._refs[key] = [storage.nbytes(), 1]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        else:
            entry[1] += 1
        packed = _Packed(t)
        weakref.finalize(packed, self._release, key)
        return packed

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


@dataclass(frozen=True)
class ActivationMeasurement:
    batch_size: int
    saved_bytes: int  # peak bytes saved for backward, no checkpointing
    checkpointed_bytes: int  # estimated peak with the model's activation checkpointing
    # name -> (bytes saved inside, tensor input bytes, live bytes when it returned), first call;
    # without and with checkpointing
    per_module: dict = field(default_factory=dict, repr=False, compare=False)
    per_module_checkpointed: dict = field(default_factory=dict, repr=False, compare=False)


def _tensor_bytes(objs) -> int:
    seen, total = set(), 0
    for o in objs:
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            if s._cdata not in seen:
                seen.add(s._cdata)
                total += s.nbytes()
    return total


def _run_measured(model: torch.nn.Module, x: torch.Tensor):
    """Forward + backward under a SavedTensorMeter with per-module bookkeeping (first call): bytes
    saved inside the module, the bytes of its tensor inputs, the live total when it returned."""
    meter = SavedTensorMeter(exclude=list(model.parameters()) + list(model.buffers()))
    stats: dict[str, list[int]] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def pre(m, args, _name=name):
            if _name not in stats:
                stats[_name] = [meter.live, -1, _tensor_bytes(args), 0]

        def post(m, args, out, _name=name):
            s = stats[_name]
            if s[1] < 0:
                s[1] = meter.live - s[0]
                s[3] = meter.live

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        with meter.hooks():
            out = model(x)
            out.float().sum().backward()
    finally:
        for h in handles:
            h.remove()
    return meter, {k: (v[1], v[2], v[3]) for k, v in stats.items()}


def measure_activations(model: torch.nn.Module, batch_size: int, img_size: int,
                        dtype: torch.dtype = torch.bfloat16) -> ActivationMeasurement:
    """Measure activation memory of one forward+backward of ``model`` (in train mode, cast to
    ``dtype`` as DeepSpeed's bf16 mode does) at ``batch_size`` x ``img_size``, on the model's
    device (meta: shapes only; cpu: a real run), with and without activation checkpointing."""
    device = next(model.parameters()).device
    model = model.to(dtype).train()
    x = torch.randn(batch_size, 3, img_size, img_size, device=device, dtype=dtype)

    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(False)
    plain, per_plain = _run_measured(model, x)
    model.zero_grad(set_to_none=True)

    ckpt_bytes, per_ckpt = plain.peak, {}
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
        ckpt, per_ckpt = _run_measured(model, x)
        model.set_grad_checkpointing(False)
        model.zero_grad(set_to_none=True)
        # Checkpointed regions: modules that saved bytes without checkpointing and none with it
        # (their saved tensors go to torch.utils.checkpoint instead); keep the outermost ones.
        regions = [n for n, (saved, _, _) in per_plain.items()
                   if saved > 0 and per_ckpt.get(n, (saved,))[0] == 0]
        outer = [n for n in regions if not any(n.startswith(r + ".") for r in regions)]
        if outer:
            inputs = sum(per_plain[n][1] for n in outer)
            largest = max(per_plain[n][0] for n in outer)
            ckpt_bytes = ckpt.peak + inputs + largest
        else:
            ckpt_bytes = ckpt.peak
    return ActivationMeasurement(batch_size, plain.peak, ckpt_bytes, per_plain, per_ckpt)


@dataclass(frozen=True)
class ActivationModel:
    """Activation bytes = fixed + per_image x micro_batch (fitted from two measured batch sizes)."""

    fixed: float
    per_image: float
    fixed_ckpt: float
    per_image_ckpt: float

    def bytes(self, micro_batch: int, checkpointing: bool) -> float:
        if checkpointing:
            return self.fixed_ckpt + self.per_image_ckpt * micro_batch
        return self.fixed + self.per_image * micro_batch


def measure_repeats_once(variant: str, batch_size: int, img_size: int, architecture: tuple = ()
                         ) -> ActivationMeasurement:
    """``measure_activations`` of the variant, run on a copy whose stages keep two blocks each: a
    stage's blocks after its first are the same block (same widths, resolution and saved tensors),
    so each further block adds exactly what its second one saved (and, under checkpointing, the
    bytes of its input). Equal to measuring the whole network (tests/test_capacity.py), at a
    fraction of the meta-device work: coatnet_7 runs 10 of its 46 blocks."""
    import dataclasses

    arch = dict(architecture)
    stages = models.get_config(variant, **arch).stages
    short = tuple(dataclasses.replace(st, depth=min(st.depth, 2)) for st in stages)
    network = models.create_model(variant, img_size=img_size, device="meta", stages=short, **arch)
    m = measure_activations(network, batch_size, img_size)
    saved = m.saved_bytes
    checkpointed = m.checkpointed_bytes
    for i, st in enumerate(stages):
        if st.depth > 2:
            first, second = f"stages.{i}.blocks.0", f"stages.{i}.blocks.1"
            block_saved, block_input, _ = m.per_module[second]
            saved += (st.depth - 2) * block_saved
            # checkpointed: what a block keeps across the pass (its boundary tensor), plus the
            # input bytes the composition counts per checkpointed region
            kept = m.per_module_checkpointed[second][2] - m.per_module_checkpointed[first][2]
            checkpointed += (st.depth - 2) * (kept + block_input)
    return ActivationMeasurement(batch_size, saved, checkpointed)


@functools.lru_cache(maxsize=64)
def activation_model(variant: str, img_size: int, batches: tuple[int, int] = (1, 2),
                     architecture: tuple = ()) -> ActivationModel:
    """Measure the actual variant at the actual resolution on the meta device at two batch sizes
    (``measure_repeats_once``) and fit bytes = a + b x batch (activations are linear in batch; the
    intercept is the few batch-independent saved tensors, e.g. relative-position bias tables)."""
    b0, b1 = batches
    m0 = measure_repeats_once(variant, b0, img_size, architecture)
    m1 = measure_repeats_once(variant, b1, img_size, architecture)
    slope = (m1.saved_bytes - m0.saved_bytes) / (b1 - b0)
    slope_c = (m1.checkpointed_bytes - m0.checkpointed_bytes) / (b1 - b0)
    return ActivationModel(
        fixed=max(m0.saved_bytes - slope * b0, 0.0), per_image=slope,
        fixed_ckpt=max(m0.checkpointed_bytes - slope_c * b0, 0.0), per_image_ckpt=slope_c,
    )
