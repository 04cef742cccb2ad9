"""The device batch transform without per-group host tensors: the batched RandAugment's output is
bit for bit what the per-group version made (the pre-issue-23 code, kept below as the reference),
and the pipeline's own code on the hot path builds ONE tensor from host values per batch and reads
no batch value back to the host.

What a CPU test can show: on a CPU there is no host->device copy and no sync, so these tests count
what WOULD be one on a GPU - tensors built from Python values (``torch.tensor`` / ``as_tensor``) and
``.item()`` / ``.tolist()`` reads - by the call site (pipeline code vs torchvision's kernels). The
real count, torchvision's kernels included, is ``torch.cuda.set_sync_debug_mode`` on a GPU:
benchmarks/device_pipeline.py (the suite has no GPU test)."""
from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter, defaultdict

import pytest
import torch
import torchvision
from torch.overrides import TorchFunctionMode

import pipeline
from pipeline.data.randaug import (REFERENCE_OPS, SIGNED, BatchRandAugment, DeviceKernels, apply_op, cutout,
                                   op_value)
from pipeline.data.transforms import AugmentConfig, DeviceBatchTransform, normalize

PIPELINE_DIR = os.path.dirname(pipeline.__file__)
HOST_BUILDERS = {"tensor", "as_tensor"}
HOST_READS = {"item", "tolist"}


def reference_apply(augment: BatchRandAugment, images: torch.Tensor, draws) -> torch.Tensor:
    """BatchRandAugment.apply as it was before issue 23: an index tensor and a centre tensor built
    from Python lists for every (op, value) group of every round."""
    out = images.clone()
    for round_ in range(augment.num_ops):
        groups: dict = defaultdict(list)
        for row, ops in enumerate(draws):
            groups[(ops[round_].op, ops[round_].value)].append(row)
        for (name, value), rows in groups.items():
            index = torch.tensor(rows, device=out.device)
            if name == "Cutout":
                out[index] = cutout(out[index], int(value), [draws[r][round_].center for r in rows])
            else:
                out[index] = apply_op(out[index], name, value)
    return out


@pytest.mark.parametrize("num_ops, magnitude, ops, batch, size", [
    (2, 15, REFERENCE_OPS, 64, 24), (3, 9, REFERENCE_OPS, 40, 17), (1, 30, REFERENCE_OPS, 33, 32),
    (2, 10, ("Cutout",), 12, 20),            # one op: every group is the whole batch
    (2, 12, ("Rotate", "Cutout"), 1, 16),    # a batch of one
])
def test_batched_randaugment_is_unchanged(num_ops, magnitude, ops, batch, size):
    g = torch.Generator().manual_seed(batch)
    images = torch.randint(0, 256, (batch, 3, size, size + 3), dtype=torch.uint8, generator=g)
    augment = BatchRandAugment(num_ops, magnitude, ops)
    for seed in range(2):
        draws = augment.sample(batch, size, size + 3, torch.Generator().manual_seed(seed))
        assert torch.equal(augment.apply(images, draws), reference_apply(augment, images, draws)), seed
        again = augment(images, torch.Generator().manual_seed(seed))
        assert torch.equal(again, augment.apply(images, draws))


@pytest.mark.skipif((torch.__version__.split("+")[0], torchvision.__version__.split("+")[0]) != ("2.14.1", "0.29.1"),
                    reason="digest recorded with torch 2.14.1 / torchvision 0.29.1 (kernels may round otherwise)")
def test_batched_randaugment_digest_recorded_before_the_change():
    """sha256 of three batches, recorded with the code before issue 23 (same seeds, same inputs)."""
    h = hashlib.sha256()
    g = torch.Generator().manual_seed(0)
    for seed, (n, m, size, b) in enumerate([(2, 15, 24, 64), (3, 9, 17, 40), (1, 30, 32, 33)]):
        images = torch.randint(0, 256, (b, 3, size, size + 3), dtype=torch.uint8, generator=g)
        h.update(BatchRandAugment(n, m)(images, torch.Generator().manual_seed(seed)).numpy().tobytes())
    assert h.hexdigest() == "c88d6aeed843ca2ac37c6655481b55843f8cf035ef83766eb2264b0735346997"


@pytest.mark.parametrize("size", [(16, 16), (13, 21)], ids=["square", "oblong"])
def test_device_kernels_equal_v2s_kernels(size):
    """DeviceKernels (no host values per call) against apply_op (v2's kernels), bit for bit, for
    the ops it replaces at every level's value, both signs; twice (the second from its cache)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, *size), dtype=torch.uint8, generator=g)
    images[0, 1] = 77                         # a flat channel: AutoContrast's degenerate case
    kernels = DeviceKernels()
    for op in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Sharpness", "AutoContrast"):
        for level in (0, 3, 10, 15, 30):
            for sign in (1, -1) if op in SIGNED else (1,):
                value = sign * op_value(op, level)
                for _ in range(2):
                    assert torch.equal(kernels(images, op, value), apply_op(images, op, value)), (op, value)
    assert torch.equal(kernels(images[:1], "Rotate", 12.0), apply_op(images[:1], "Rotate", 12.0))


def test_normalising_with_cached_constants_equals_v2_normalize():
    cfg = AugmentConfig()
    images = torch.randint(0, 256, (5, 3, 9, 11), dtype=torch.uint8)
    tf = DeviceBatchTransform(cfg, 10, "single")
    assert torch.equal(tf._normalized(images), normalize(cfg)(images))


class HostTraffic(TorchFunctionMode):
    """Counts tensors built from Python values and values read back to Python, by call site
    (pipeline code or elsewhere); remembers the tensors drawn from explicit CPU generators."""

    def __init__(self) -> None:
        super().__init__()
        self.built: Counter = Counter()
        self.reads: list[str] = []
        self._drawn: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.endswith(("overrides.py", "_ops.py")):
            frame = frame.f_back
        where = frame.f_code.co_filename if frame is not None else "?"
        ours = where.startswith(PIPELINE_DIR)
        out = func(*args, **kwargs)
        if name in HOST_BUILDERS:
            self.built["pipeline" if ours else "torchvision/torch"] += 1
        if (name in ("randint", "rand") and kwargs.get("generator") is not None) or any(
                id(a) in self._drawn for a in args if isinstance(a, torch.Tensor)):
            self._drawn.add(id(out))         # a draw, or computed from draws only
        if name in HOST_READS and ours and id(args[0]) not in self._drawn:
            self.reads.append(f"{os.path.relpath(where, PIPELINE_DIR)}:{frame.f_lineno}")
        return out


@pytest.mark.parametrize("batch", [8, 64])
@pytest.mark.parametrize("ops", [REFERENCE_OPS, ("Cutout", "Invert", "Posterize", "Rotate")], ids=["all", "four"])
def test_the_hot_path_builds_one_host_tensor_per_batch(batch, ops):
    """DeviceBatchTransform.apply (RandAugment 2 rounds, normalise, smoothing, MixUp): the pipeline's
    own code builds exactly one tensor from Python values (BatchRandAugment's plan) whatever the
    batch size or the number of (op, value) groups, torchvision's kernels none (DeviceKernels), and
    only the CPU generator's draws are read back. Before issue 23: one per group plus one per
    Cutout group (up to 2 x 22 per batch), two in Normalize, and 2-3 in each geometric and
    Sharpness group's v2 kernel."""
    cfg = AugmentConfig(randaug_device=True, randaug_ops=ops, mixup_alpha=0.8)
    tf = DeviceBatchTransform(cfg, 10, "single")
    images = torch.randint(0, 256, (batch, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch,))
    tf.apply(images, labels, 0)              # warm: constants made once per device ...
    for op in set(ops) - {"Cutout"}:         # ... and each (op, value)'s grid or kernel
        for sign in (1, -1) if op in SIGNED else (1,):
            tf._randaug.kernels(images, op, sign * op_value(op, 15))
    groups = {len(BatchRandAugment(2, 15, ops).plan(
        BatchRandAugment(2, 15, ops).sample(batch, 16, 16, torch.Generator().manual_seed(s)))[0][0]) for s in (1, 2)}
    assert max(groups) > 1                   # several groups per round: the old code built several
    for seed in (1, 2):
        with HostTraffic() as traffic:
            tf.apply(images, labels, seed)
        assert traffic.built == {"pipeline": 1}, traffic.built       # none in torchvision's kernels
        assert traffic.reads == [], traffic.reads


def test_without_randaugment_nothing_is_built_from_host_values():
    tf = DeviceBatchTransform(AugmentConfig(mixup_alpha=0.0, cutmix_alpha=1.0), 10, "single")
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    tf.apply(images, torch.randint(0, 10, (16,)), 0)
    with HostTraffic() as traffic:
        tf.apply(images, torch.randint(0, 10, (16,)), 1)
    assert traffic.built["pipeline"] == 0 and traffic.reads == []
