"""Train / eval transforms from torchvision.transforms.v2, configured by ``AugmentConfig``.

Per sample, in the loader workers (uint8 CHW tensor in): train = RandomResizedCrop -> horizontal
flip -> RandAugment(N, M) (on PIL, where it is cheapest; or per batch, see below); eval = resize to
``img_size / eval_crop_pct`` -> centre crop.

Per batch (``DeviceBatchTransform``), on whichever device it is called with: batched RandAugment when
``randaug_device`` is set, float + normalise, and (train only) targets one-hot (single-label) or
multi-hot (multi-label), smoothed, then MixUp or CutMix (v2, chosen at random per batch when both
are on). The loader runs it in its workers for ``output="float"``; with ``output="uint8"`` the
trainer runs it on the training device. Its randomness comes only from the batch's ``seed`` (CPU
generators, then the ops on the device), so both places give the same batch.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from torchvision.transforms import v2

if TYPE_CHECKING:
    from pipeline.data.loader import Batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """The paper's augmentation knobs. Defaults: CoAtNet's ImageNet-1K recipe
    (RandAugment 2/15, MixUp 0.8, label smoothing 0.1, Inception crop scale 0.08-1)."""

    randaug_n: int = 2                 # 0: RandAugment off
    randaug_m: int = 15                # magnitude, 0..30 (v2's num_magnitude_bins=31)
    mixup_alpha: float = 0.8           # 0: off
    cutmix_alpha: float = 0.0          # 0: off; with both on, one of them per batch
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    eval_crop_pct: float = 0.875
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    randaug_device: bool = False       # RandAugment per batch in BatchTransform (on the GPU) instead
                                       # of per sample in the loader workers
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.randaug_n < 0 or not 0 <= self.randaug_m <= 30:
            raise ValueError(f"randaug_n must be >= 0 and randaug_m in 0..30, got {self.randaug_n}, {self.randaug_m}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.eval_crop_pct <= 1:
            raise ValueError(f"eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation beyond the random crop and flip (e.g. for tests or JFT-style runs)."""
        return cls(randaug_n=0, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)


def _interpolation(cfg: AugmentConfig) -> v2.InterpolationMode:
    return v2.InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR


def crop_transform(cfg: AugmentConfig, img_size: int, train: bool) -> v2.Transform:
    """uint8 [3,H,W] -> uint8 [3,img_size,img_size]: the per-sample part (crop, flip, RandAugment
    on uint8, where they are cheapest); normalisation runs once per batch (``normalize``)."""
    interpolation = _interpolation(cfg)
    if train:
        steps: list[v2.Transform] = [
            v2.RandomResizedCrop(img_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                                 interpolation=interpolation, antialias=True),
        ]
        if cfg.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(cfg.hflip))
        if cfg.randaug_n > 0 and not cfg.randaug_device:
            # RandAugment runs on a PIL image: its affine and histogram ops are 2-3x cheaper there
            # than on tensors (measured: 0.54 vs 1.47 ms per 224 px image on one core). Nearest
            # interpolation for its geometric ops, as in the reference TF implementation the paper
            # used (and torchvision's default); bilinear costs about twice as much here.
            steps += [v2.ToPILImage(),
                      v2.RandAugment(num_ops=cfg.randaug_n, magnitude=cfg.randaug_m),
                      v2.PILToTensor()]
    else:
        steps = [v2.Resize(int(round(img_size / cfg.eval_crop_pct)), interpolation=interpolation,
                           antialias=True),
                 v2.CenterCrop(img_size)]
    return v2.Compose(steps)


def normalize(cfg: AugmentConfig) -> v2.Transform:
    """uint8 images (one or a batch) -> float32, scaled to [0, 1] and normalised."""
    # in place: ToDtype's output is a fresh tensor, so Normalize need not copy it again
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std, inplace=True)])


def sample_transform(cfg: AugmentConfig, img_size: int, train: bool) -> v2.Transform:
    """uint8 [3,H,W] -> float [3,img_size,img_size], normalised (what a batch row goes through;
    for prediction and evaluation, so RandAugment is always per sample here)."""
    cfg = replace(cfg, randaug_device=False)
    return v2.Compose([crop_transform(cfg, img_size, train), normalize(cfg)])


def batch_mixer(cfg: AugmentConfig) -> v2.Transform | None:
    """MixUp / CutMix on (images, probability targets), or None when both are off."""
    mixers: list[v2.Transform] = []
    if cfg.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup_alpha))
    if cfg.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def make_targets(labels: torch.Tensor, num_classes: int, label_smoothing: float) -> torch.Tensor:
    """float [B, C] targets from long [B] class indices or a float [B, C] multi-hot, smoothed as
    timm does: on = 1 - eps + eps / C, off = eps / C."""
    hot = labels.float() if labels.ndim == 2 else torch.nn.functional.one_hot(labels, num_classes).float()
    if label_smoothing > 0:
        hot = hot * (1 - label_smoothing) + label_smoothing / num_classes
    return hot


# ---------------------------------------------------------------------------------------------
# Per batch, on any device
# ---------------------------------------------------------------------------------------------

RandAugmentOp = tuple[str, float]      # (v2.RandAugment op name, signed magnitude)


class BatchRandAugment:
    """v2.RandAugment(num_ops, magnitude) applied to a uint8 batch [B, 3, H, W] on its device with
    an independent draw per image, as the per-sample transform does.

    The draws (op uniform over v2's 14 ops, sign of a signed magnitude +/- with probability 1/2)
    come from a CPU generator; each op then runs once per round on the images that drew it
    (v2's own functional kernels, batched), so a 14-op space costs at most 14 kernel calls per
    round whatever the batch size. Geometric ops use nearest interpolation, as v2's default."""

    def __init__(self, num_ops: int, magnitude: int, num_magnitude_bins: int = 31) -> None:
        self._v2 = v2.RandAugment(num_ops=num_ops, magnitude=magnitude,
                                  num_magnitude_bins=num_magnitude_bins)
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.num_magnitude_bins = num_magnitude_bins
        self.op_names: tuple[str, ...] = tuple(v2.RandAugment._AUGMENTATION_SPACE)

    def sample(self, batch_size: int, height: int, width: int,
               generator: torch.Generator) -> list[list[RandAugmentOp]]:
        """Per image, its ``num_ops`` (op, magnitude) draws, in the order they are applied."""
        space = v2.RandAugment._AUGMENTATION_SPACE
        ids = torch.randint(len(self.op_names), (batch_size, self.num_ops), generator=generator)
        flips = torch.rand((batch_size, self.num_ops), generator=generator) <= 0.5
        magnitudes: dict[str, float | None] = {}
        for name in self.op_names:
            values = space[name][0](self.num_magnitude_bins, height, width)
            magnitudes[name] = None if values is None else float(values[self.magnitude])
        draws: list[list[RandAugmentOp]] = []
        for row_ids, row_flips in zip(ids.tolist(), flips.tolist()):
            row: list[RandAugmentOp] = []
            for i, flip in zip(row_ids, row_flips):
                name = self.op_names[i]
                value = magnitudes[name]
                if value is None:
                    value = 0.0
                elif space[name][1] and flip:
                    value = -value
                row.append((name, value))
            draws.append(row)
        return draws

    def apply(self, images: torch.Tensor, draws: list[list[RandAugmentOp]]) -> torch.Tensor:
        out = images.clone()
        for round_ in range(self.num_ops):
            groups: dict[RandAugmentOp, list[int]] = defaultdict(list)
            for row, ops in enumerate(draws):
                groups[ops[round_]].append(row)
            for (name, value), rows in groups.items():
                if name == "Identity":
                    continue
                index = torch.tensor(rows, device=out.device)
                out[index] = self._v2._apply_image_or_video_transform(
                    out[index], name, value, interpolation=self._v2.interpolation, fill=self._v2._fill)
        return out

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample(len(images), images.shape[-2], images.shape[-1], generator))


class DeviceBatchTransform:
    """uint8 images [B, 3, H, W] + labels -> (float images normalised, float targets [B, C]), on
    the device the images are on: batched RandAugment (``augment.randaug_device``), ToDtype +
    Normalize, then for training smoothed one-/multi-hot targets mixed by MixUp / CutMix.

    Deterministic for a given ``seed`` whatever the device: every random draw is taken on the CPU
    from ``seed``; the batch's own seed is ``Batch.seed``. Eval: no randomness, plain targets.

    In a training step: ``images, targets = tf(batch, device)`` right after ``next(loader)`` and
    before the forward; a batch the loader already made float (``output="float"``) passes through."""

    def __init__(self, augment: AugmentConfig, num_classes: int, label_type: Literal["single", "multi"],
                 train: bool = True) -> None:
        if label_type not in ("single", "multi"):
            raise ValueError(f"label_type must be 'single' or 'multi', got {label_type!r}")
        self.augment = augment
        self.num_classes = num_classes
        self.label_type = label_type
        self.train = train
        self._normalize = normalize(augment)
        self._mixer = batch_mixer(augment) if train else None
        self._randaug = (BatchRandAugment(augment.randaug_n, augment.randaug_m)
                         if train and augment.randaug_device and augment.randaug_n > 0 else None)
        self._smoothing = augment.label_smoothing if train else 0.0

    def __call__(self, batch: "Batch", device: torch.device | str = "cpu",
                 non_blocking: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets) of a loader batch on ``device``, seeded by ``batch.seed``."""
        images = batch.images.to(device, non_blocking=non_blocking)
        if batch.targets is not None:           # made by the loader (output="float")
            return images, batch.targets.to(device, non_blocking=non_blocking)
        return self.apply(images, batch.labels.to(device, non_blocking=non_blocking), batch.seed)

    def apply(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The transform on tensors already on their device: uint8 [B, 3, H, W] and long [B] class
        indices | float [B, C] multi-hot."""
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceBatchTransform takes uint8 images, got {images.dtype}")
        if self._randaug is not None and len(images):
            images = self._randaug(images, torch.Generator().manual_seed(seed))
        images = self._normalize(images)
        targets = make_targets(labels, self.num_classes, self._smoothing)
        if self._mixer is not None and len(images) > 1:
            # v2's MixUp/CutMix draw from torch's global CPU generator: fork it, seeded by the
            # batch (only the CPU one: torch.manual_seed would reseed the GPU's for the step too)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(_mix_seed(seed))
                images, targets = self._mixer(images, targets)
        return images, targets


def _mix_seed(seed: int) -> int:
    # RandAugment's generator takes ``seed`` itself; MixUp gets another stream of the same seed
    return (seed * 0x9E3779B97F4A7C15 + 1) % (1 << 63)
