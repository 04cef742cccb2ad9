"""Train / eval transforms from torchvision.transforms.v2, configured by ``AugmentConfig``.

Per sample, in the loader workers (uint8 CHW tensor in): train = RandomResizedCrop -> horizontal
flip -> RandAugment(N, M) with the TF reference's semantics (``pipeline.data.randaug``; on PIL, where
it is cheapest; or per batch, see below); eval = resize to ``img_size / eval_crop_pct`` -> centre crop.

Per batch (``DeviceBatchTransform``), on whichever device it is called with: batched RandAugment when
``randaug_device`` is set, float + normalise, and (train only) targets one-hot (single-label) or
multi-hot (multi-label), smoothed, then MixUp or CutMix (v2, chosen at random per batch when both
are on). The loader runs it in its workers for ``output="float"``; with ``output="uint8"`` the
trainer runs it on the training device. Its randomness comes only from the batch's ``seed`` (CPU
generators, then the ops on the device), so both places give the same batch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from torchvision.transforms import v2

from pipeline.data.devicedecode import DecodeStats
from pipeline.data.randaug import REFERENCE_OPS, BatchRandAugment, RandAugment, check_ops

if TYPE_CHECKING:
    from pipeline.data.loader import Batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """The paper's augmentation knobs. Defaults: CoAtNet's ImageNet-1K recipe
    (RandAugment 2/15, MixUp 0.8, label smoothing 0.1, Inception crop scale 0.08-1)."""

    randaug_n: int = 2                 # 0: RandAugment off
    randaug_m: float = 15              # the reference's level: 0-10 nominal, above 10 allowed (to 30)
    randaug_ops: tuple[str, ...] = REFERENCE_OPS   # by the reference's names (default: all 16)
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
        object.__setattr__(self, "randaug_ops", check_ops(tuple(self.randaug_ops)))
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
            # than on tensors (measured with v2's RandAugment: 0.54 vs 1.47 ms per 224 px image on
            # one core). Nearest interpolation for its geometric ops, as in the TF reference.
            steps += [v2.ToPILImage(), randaugment(cfg), v2.PILToTensor()]
    else:
        steps = [v2.Resize(int(round(img_size / cfg.eval_crop_pct)), interpolation=interpolation,
                           antialias=True),
                 v2.CenterCrop(img_size)]
    return v2.Compose(steps)


def randaugment(cfg: AugmentConfig) -> RandAugment:
    """The per-sample RandAugment of ``cfg`` (the TF reference's semantics)."""
    return RandAugment(cfg.randaug_n, cfg.randaug_m, cfg.randaug_ops)


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
        self.decode_stats = DecodeStats()      # decode="device" batches: JPEGs decoded here, refused
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mixer = batch_mixer(augment) if train else None
        self._randaug = (BatchRandAugment(augment.randaug_n, augment.randaug_m, augment.randaug_ops)
                         if train and augment.randaug_device and augment.randaug_n > 0 else None)
        self._smoothing = augment.label_smoothing if train else 0.0

    def __call__(self, batch: "Batch", device: torch.device | str = "cpu",
                 non_blocking: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets) of a loader batch on ``device``, seeded by ``batch.seed``; its JPEGs
        decoded there first when the loader left them encoded (``decode="device"``)."""
        images = (batch.decoded_images(device, non_blocking, self.decode_stats) if batch.encoded is not None
                  else batch.images.to(device, non_blocking=non_blocking))
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
        images = self._normalized(images)
        targets = make_targets(labels, self.num_classes, self._smoothing)
        if self._mixer is not None and len(images) > 1:
            # v2's MixUp/CutMix draw from torch's global CPU generator: fork it, seeded by the
            # batch (only the CPU one: torch.manual_seed would reseed the GPU's for the step too)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(_mix_seed(seed))
                images, targets = self._mixer(images, targets)
        return images, targets


    def _normalized(self, images: torch.Tensor) -> torch.Tensor:
        """``normalize(augment)`` with its mean and std made once per device (v2's Normalize builds
        both from Python lists on every call: two host->device copies per batch on a GPU); the
        same operations in the same order, so the same floats."""
        if images.device not in self._constants:
            self._constants[images.device] = tuple(          # type: ignore[assignment]
                torch.as_tensor(v, dtype=torch.float32, device=images.device).view(-1, 1, 1)
                for v in (self.augment.mean, self.augment.std))
        mean, std = self._constants[images.device]
        return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_constants": {}}        # device tensors stay where they were made


def _mix_seed(seed: int) -> int:
    # RandAugment's generator takes ``seed`` itself; MixUp gets another stream of the same seed
    return (seed * 0x9E3779B97F4A7C15 + 1) % (1 << 63)
