"""RandAugment as the TF reference the paper used (tensorflow/tpu, efficientnet ``autoaugment.py``,
``distort_image_with_randaugment``), on one image (per sample, in the loader workers: PIL or
tensor) and on a uint8 batch (``BatchRandAugment``, on the training device). Both draw with
``sample_draws`` and apply each op through ``apply_op``, so they share one set of rules.

The reference's semantics, kept here:

- M is a level on the 0-10 scale; an op's value is ``level / 10 x its maximum``; levels above 10
  are allowed (no clamp: M=15 rotates by 45 degrees).
- 16 ops (``REFERENCE_OPS``, the reference's order; no Identity). Per layer one op uniform over
  the chosen ops, always applied (the reference's per-op probability is unused by RandAugment).
- Values: Rotate 30 deg, ShearX/Y 0.3, TranslateX/Y 100 px (absolute, whatever the image size),
  each negated with probability 1/2; Color/Contrast/Brightness/Sharpness factor level/10 x 1.8 + 0.1;
  Posterize keeps int(level/10 x 4) bits (fewer bits at LOWER levels: the reference's rule);
  Solarize threshold int(level/10 x 256) (no pixel changes from level 10 up); SolarizeAdd adds
  int(level/10 x 110) below threshold 128; Cutout a square of half-side int(level/10 x 40) at a
  uniform centre; fill 128 for Rotate/Shear/Translate/Cutout; nearest interpolation.

Departures (docs/DESIGN.md, models/README.md): Contrast blends towards the grayscale MEAN
(PIL / torchvision) where the reference's ``contrast`` uses sum(histogram) / 256 = pixels / 256 (a
known bug: 196 at 224 px, clipped to 255 from 256 px up, whatever the image); Posterize bits are
clamped to 8 (the reference shifts by a negative amount above level 22); the PIL and tensor kernels
round the enhance and affine ops slightly differently (within one grey level / a few border pixels,
tested).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

REFERENCE_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")
SIGNED = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
MAX_LEVEL = 10.0
FILL = 128                 # the reference's replace value for geometric ops and Cutout
TRANSLATE_CONST = 100      # pixels at level 10 (the reference's hparams)
CUTOUT_CONST = 40          # half-side in pixels at level 10
SOLARIZE_ADD_THRESHOLD = 128
NEAREST = InterpolationMode.NEAREST


def check_ops(ops: Sequence[str]) -> tuple[str, ...]:
    """The chosen op names, in the reference's order; ValueError naming an unknown one."""
    unknown = [o for o in ops if o not in REFERENCE_OPS]
    if unknown:
        raise ValueError(f"unknown RandAugment op(s) {unknown}; valid: {', '.join(REFERENCE_OPS)}")
    if not ops:
        raise ValueError("randaug_ops must name at least one op")
    return tuple(o for o in REFERENCE_OPS if o in set(ops))


def op_value(name: str, level: float) -> float:
    """The unsigned value of ``name`` at ``level`` (the reference's level_to_arg), 0 for ops
    without one."""
    frac = level / MAX_LEVEL
    if name == "Rotate":
        return frac * 30.0
    if name in ("ShearX", "ShearY"):
        return frac * 0.3
    if name in ("TranslateX", "TranslateY"):
        return frac * TRANSLATE_CONST
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return frac * 1.8 + 0.1
    if name == "Posterize":
        return float(int(frac * 4))
    if name == "Solarize":
        return float(int(frac * 256))
    if name == "SolarizeAdd":
        return float(int(frac * 110))
    if name == "Cutout":
        return float(int(frac * CUTOUT_CONST))
    return 0.0


@dataclass(frozen=True)
class Draw:
    """One applied op: its name, signed value and, for Cutout, the centre (row, column)."""
    op: str
    value: float
    center: tuple[int, int] | None = None


def sample_draws(ops: Sequence[str], num_ops: int, magnitude: float, count: int, height: int, width: int,
                 generator: torch.Generator | None = None) -> list[list[Draw]]:
    """Per image, its ``num_ops`` draws in order: op uniform over ``ops``, sign +/- at 1/2 for the
    signed ops, a uniform Cutout centre. ``generator=None``: torch's global CPU generator (the
    loader seeds it per batch, as for the crops)."""
    ids = torch.randint(len(ops), (count, num_ops), generator=generator).tolist()
    negate = (torch.rand((count, num_ops), generator=generator) < 0.5).tolist()
    rows = torch.randint(height, (count, num_ops), generator=generator).tolist()
    cols = torch.randint(width, (count, num_ops), generator=generator).tolist()
    values = {name: op_value(name, magnitude) for name in ops}
    out: list[list[Draw]] = []
    for i in range(count):
        row: list[Draw] = []
        for j in range(num_ops):
            name = ops[ids[i][j]]
            value = -values[name] if name in SIGNED and negate[i][j] else values[name]
            row.append(Draw(name, value, (rows[i][j], cols[i][j]) if name == "Cutout" else None))
        out.append(row)
    return out


def _is_pil(image: Any) -> bool:
    return not isinstance(image, torch.Tensor)


def _affine(image, *, angle: float = 0.0, translate=(0.0, 0.0), shear=(0.0, 0.0), center=None):
    return F.affine(image, angle=angle, translate=list(translate), scale=1.0, shear=list(shear),
                    interpolation=NEAREST, fill=FILL, center=center)


def apply_op(image, op: str, value: float):
    """One op with its signed value on a uint8 tensor [..., 3, H, W] (a batch is one value for
    every image) or a PIL image. Cutout goes through ``cutout`` (it needs centres)."""
    if op == "AutoContrast":
        return F.autocontrast(image)
    if op == "Equalize":
        return F.equalize(image)
    if op == "Invert":
        return F.invert(image)
    if op == "Rotate":
        return F.rotate(image, value, interpolation=NEAREST, fill=FILL)
    if op == "Posterize":
        return F.posterize(image, max(0, min(8, int(value))))
    if op == "Solarize":
        return image if value > 255 else F.solarize(image, value)
    if op == "SolarizeAdd":
        return solarize_add(image, int(value))
    if op == "Color":
        return F.adjust_saturation(image, value)
    if op == "Contrast":
        return F.adjust_contrast(image, value)
    if op == "Brightness":
        return F.adjust_brightness(image, value)
    if op == "Sharpness":
        return F.adjust_sharpness(image, value)
    if op in ("ShearX", "ShearY"):
        # the reference's transform (1, level, 0; 0, 1, 0) reads input (x + level * y, y): a shear
        # about pixel (0, 0) by the slope ``level``; v2's shear is an angle, atan(level), and its
        # coordinates put pixel (0, 0)'s centre at (0.5, 0.5) (v2's RandAugment uses (0, 0): a
        # half-pixel offset that moves ~17% of the pixels at 0.45)
        degrees = math.degrees(math.atan(value))
        return _affine(image, shear=(degrees, 0.0) if op == "ShearX" else (0.0, degrees), center=[0.5, 0.5])
    if op == "TranslateX":     # the reference's translate(image, [-pixels, 0]): content moves by -pixels
        return _affine(image, translate=(-value, 0.0))
    if op == "TranslateY":
        return _affine(image, translate=(0.0, -value))
    raise ValueError(f"unknown RandAugment op {op!r}")


def solarize_add(image, addition: int, threshold: int = SOLARIZE_ADD_THRESHOLD):
    """Pixels below ``threshold`` get ``addition`` (clipped to 255); the rest stay."""
    if _is_pil(image):
        lut = [min(255, v + addition) if v < threshold else v for v in range(256)]
        return image.point(lut * len(image.getbands()))
    added = (image.to(torch.int16) + addition).clamp_(0, 255).to(torch.uint8)
    return torch.where(image < threshold, added, image)


def cutout(image, half: int, centers: Sequence[tuple[int, int]] | torch.Tensor):
    """A (2*half)-sided square around each image's centre, clipped at the borders, set to 128
    (the reference: rows max(0, cy - half) .. min(H, cy + half)). ``centers``: (row, column) per
    image, a list or a long tensor [n, 2] on the image's device."""
    if _is_pil(image):
        from PIL import ImageDraw

        (cy, cx), = centers
        if half > 0:
            image = image.copy()
            box = (max(0, cx - half), max(0, cy - half), min(image.width, cx + half) - 1,
                   min(image.height, cy + half) - 1)
            if box[2] >= box[0] and box[3] >= box[1]:
                ImageDraw.Draw(image).rectangle(box, fill=(FILL,) * len(image.getbands()))
        return image
    h, w = image.shape[-2:]
    # centres as a tensor already on the device (the batched path) or (row, column) pairs
    c = (centers if isinstance(centers, torch.Tensor) else torch.tensor(centers, device=image.device)).view(-1, 2, 1)
    ys = torch.arange(h, device=image.device)
    xs = torch.arange(w, device=image.device)
    in_y = (ys >= c[:, 0] - half) & (ys < c[:, 0] + half)             # [n, H]
    in_x = (xs >= c[:, 1] - half) & (xs < c[:, 1] + half)             # [n, W]
    mask = (in_y[:, :, None] & in_x[:, None, :]).view(*image.shape[:-3], 1, h, w)
    return image.masked_fill(mask, FILL)


def apply_draws(image, draws: Sequence[Draw]):
    """One image (uint8 tensor [3, H, W] or PIL) through its draws, in order."""
    for d in draws:
        if d.op == "Cutout":
            image = cutout(image if _is_pil(image) else image[None], int(d.value), [d.center])
            image = image if _is_pil(image) else image[0]
        else:
            image = apply_op(image, d.op, d.value)
    return image


class RandAugment:
    """Per sample: ``RandAugment(num_ops, magnitude, ops)(image)`` on a PIL image or a uint8
    tensor [3, H, W], drawing from torch's global generator (as the loader's other per-sample
    transforms do)."""

    def __init__(self, num_ops: int, magnitude: float, ops: Sequence[str] = REFERENCE_OPS) -> None:
        self.num_ops, self.magnitude, self.ops = num_ops, float(magnitude), check_ops(ops)

    def sample(self, height: int, width: int) -> list[Draw]:
        return sample_draws(self.ops, self.num_ops, self.magnitude, 1, height, width)[0]

    def __call__(self, image):
        h, w = (image.height, image.width) if _is_pil(image) else image.shape[-2:]
        return apply_draws(image, self.sample(h, w))

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, ops={list(self.ops)})"


# ---------------------------------------------------------------------------------------------
# The same tensor kernels without host->device copies (the batched path on a GPU)
# ---------------------------------------------------------------------------------------------

class DeviceKernels:
    """v2's tensor kernels for the ops whose implementation builds tensors from Python values on
    every call (a host->device copy, i.e. a host sync on a GPU): Rotate/Shear/Translate (the affine
    matrix, its scale and the fill), Sharpness (its 3x3 kernel), AutoContrast (a masked assignment,
    which syncs). The same arithmetic in the same order, so the same output bit for bit
    (tested against ``apply_op``); what depends only on (op, value, size) - the sampling grid,
    the blur kernel - is made once per device and kept."""

    def __init__(self) -> None:
        self._cache: dict[tuple, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        return {"_cache": {}}               # device tensors stay where they were made

    def __call__(self, image: torch.Tensor, op: str, value: float) -> torch.Tensor:
        if op in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
            grid = self._grid(image, op, value)
            return apply_op(image, op, value) if grid is None else _sample_with_fill(image, grid)
        if op == "Sharpness":
            return self._sharpness(image, value)
        if op == "AutoContrast":
            return _autocontrast(image)
        return apply_op(image, op, value)

    def _grid(self, image: torch.Tensor, op: str, value: float) -> torch.Tensor | None:
        from torchvision.transforms.functional import _get_inverse_affine_matrix

        h, w = image.shape[-2:]
        key = ("grid", image.device, op, value, h, w)
        if key not in self._cache:
            if op == "Rotate":
                angle = value % 360
                if angle in (0, 180) or (h == w and angle in (90, 270)):
                    return None                 # v2 takes a copy or rot90 there: no host values
                matrix = _get_inverse_affine_matrix([0.0, 0.0], -angle, [0.0, 0.0], 1.0, [0.0, 0.0])
            else:                               # the arguments apply_op hands to F.affine
                degrees = math.degrees(math.atan(value))
                shear = {"ShearX": [degrees, 0.0], "ShearY": [0.0, degrees]}.get(op, [0.0, 0.0])
                translate = {"TranslateX": [-value, 0.0], "TranslateY": [0.0, -value]}.get(op, [0.0, 0.0])
                center = [0.5 - w * 0.5, 0.5 - h * 0.5] if op.startswith("Shear") else [0.0, 0.0]
                matrix = _get_inverse_affine_matrix(center, 0.0, [float(t) for t in translate], 1.0,
                                                    [float(x) for x in shear])
            # v2's _affine_grid, on the device
            theta = torch.tensor(matrix, dtype=torch.float32, device=image.device).reshape(1, 2, 3)
            base = torch.empty(1, h, w, 3, dtype=torch.float32, device=image.device)
            base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=image.device))
            base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h,
                                              device=image.device).unsqueeze_(-1))
            base[..., 2].fill_(1)
            scale = torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32, device=image.device)
            self._cache[key] = base.view(1, h * w, 3).bmm(theta.transpose(1, 2).div_(scale)).view(1, h, w, 2)
        return self._cache[key]

    def _sharpness(self, image: torch.Tensor, factor: float) -> torch.Tensor:
        """v2's adjust_sharpness_image on uint8 [..., 3, H, W], its kernel made once per device."""
        c, h, w = image.shape[-3:]
        if image.numel() == 0 or h <= 2 or w <= 2:
            return image
        key = ("sharpness", image.device, c)
        if key not in self._cache:
            a, b = 1.0 / 13.0, 5.0 / 13.0
            self._cache[key] = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=torch.float32,
                                            device=image.device).expand(c, 1, 3, 3)
        shape = image.shape
        output = image.reshape(-1, c, h, w).to(dtype=torch.float32, copy=True)
        blurred = torch.nn.functional.conv2d(output, self._cache[key], groups=c).round_()
        view = output[..., 1:-1, 1:-1]
        view.add_(blurred.sub_(view), alpha=(1.0 - factor))
        return output.clamp_(0, 255).to(image.dtype).reshape(shape)


def _autocontrast(image: torch.Tensor) -> torch.Tensor:
    """v2's autocontrast_image on uint8, the masked assignments as ``torch.where`` (no sync)."""
    if image.numel() == 0:
        return image
    float_image = image.to(torch.float32)
    minimum = float_image.amin(dim=(-2, -1), keepdim=True)
    maximum = float_image.amax(dim=(-2, -1), keepdim=True)
    eq = maximum == minimum
    inv_scale = maximum.sub_(minimum).mul_(1.0 / 255)
    minimum = torch.where(eq, 0.0, minimum)
    inv_scale = torch.where(eq, 1.0, inv_scale)
    return float_image.sub_(minimum).div_(inv_scale).clamp_(0, 255).to(image.dtype)


def _sample_with_fill(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """v2's _apply_grid_transform (nearest, fill 128) on uint8 [..., 3, H, W]; the fill as a scalar."""
    shape = image.shape
    img = image.reshape(-1, *shape[-3:])
    n, _, h, w = img.shape
    float_img = torch.cat((img.to(torch.float32),
                           torch.ones((n, 1, h, w), dtype=torch.float32, device=img.device)), dim=1)
    float_img = torch.nn.functional.grid_sample(float_img, grid.expand(n, -1, -1, -1) if n > 1 else grid,
                                                mode="nearest", padding_mode="zeros", align_corners=False)
    float_img, mask = torch.tensor_split(float_img, indices=(-1,), dim=-3)
    float_img = torch.where(mask.expand_as(float_img) < 0.5, float(FILL), float_img)
    return float_img.round_().to(image.dtype).reshape(shape)


class BatchRandAugment:
    """The same RandAugment on a uint8 batch [B, 3, H, W] on its device, an independent draw per
    image from a CPU generator; per round each (op, signed value) group runs once on the images
    that drew it (Cutout: one masked fill for all its images), so a round costs at most
    len(ops) + 5 kernel calls (the signed ops have two values) whatever the batch size.

    Host to device: ONE small copy per batch (``plan``: every round's rows, grouped, with their
    Cutout centres; pinned and non-blocking on CUDA); a group's rows are a slice of it, so no
    tensor is built per group and nothing waits for the device. The ops whose v2 kernels build
    tensors from host values run through ``DeviceKernels`` (the same arithmetic, their constants
    made once per device); benchmarks/device_pipeline.py counts what is left on a GPU."""

    def __init__(self, num_ops: int, magnitude: float, ops: Sequence[str] = REFERENCE_OPS) -> None:
        self.num_ops, self.magnitude, self.ops = num_ops, float(magnitude), check_ops(ops)
        self.kernels = DeviceKernels()

    def sample(self, batch_size: int, height: int, width: int, generator: torch.Generator) -> list[list[Draw]]:
        return sample_draws(self.ops, self.num_ops, self.magnitude, batch_size, height, width, generator)

    def plan(self, draws: list[list[Draw]]) -> tuple[list[list[tuple[str, float, int, int]]], torch.Tensor]:
        """Per round its groups ``(op, value, start, end)`` and one CPU long tensor [rounds, B, 3]:
        per round the batch's rows, group after group (each group's rows ascending), with each
        row's Cutout centre (row, column; 0 for other ops). Built on the host from Python values
        in one ``torch.tensor`` call."""
        spans: list[list[tuple[str, float, int, int]]] = []
        table: list[tuple[int, int, int]] = []
        for round_ in range(self.num_ops):
            groups: dict[tuple[str, float], list[int]] = defaultdict(list)
            for row, ops in enumerate(draws):
                groups[(ops[round_].op, ops[round_].value)].append(row)
            start, mine = len(table) - round_ * len(draws), []
            for (name, value), rows in groups.items():
                mine.append((name, value, start, start + len(rows)))
                start += len(rows)
                table.extend((r, *(draws[r][round_].center or (0, 0))) for r in rows)
            spans.append(mine)
        return spans, torch.tensor(table, dtype=torch.long).view(self.num_ops, len(draws), 3)

    def apply(self, images: torch.Tensor, draws: list[list[Draw]]) -> torch.Tensor:
        out = images.clone()
        if not len(images):
            return out
        spans, table = self.plan(draws)
        if out.device.type == "cuda":          # pinned + non_blocking: the host does not wait
            table = table.pin_memory()
        table = table.to(out.device, non_blocking=True)
        for round_, groups in enumerate(spans):
            for name, value, start, end in groups:
                whole = end - start == len(out)       # one group: its rows are 0..B-1 in order
                rows = table[round_, start:end]
                part = out if whole else out[rows[:, 0]]
                if name == "Cutout":
                    part = cutout(part, int(value), rows[:, 1:])
                else:
                    part = self.kernels(part, name, value)
                if whole:
                    out = part
                else:
                    out[rows[:, 0]] = part
        return out

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample(len(images), images.shape[-2], images.shape[-1], generator))
