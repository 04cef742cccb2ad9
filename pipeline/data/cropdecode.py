"""Crop-aware JPEG decode for training: RandomResizedCrop's box is drawn from the header's size
first, then PIL decodes the JPEG DCT-scaled (``Image.draft``: 1/2, 1/4 or 1/8 of the pixels,
chosen so the crop still has at least ``img_size`` pixels per side, i.e. the final resize still
shrinks) and resizes only the crop box (``Image.resize(box=...)``, antialiased as torchvision's
``antialias=True``). Flip and, unless it runs per batch, RandAugment follow on the PIL image.

The random draws are torchvision's own, in the same order as ``transforms.crop_transform``
(RandomResizedCrop.make_params, RandomHorizontalFlip, RandAugment), so for a seed the crop box,
flip and RandAugment ops are exactly those of the general path; only the resampling differs
(DCT scaling + PIL's filter instead of a full decode + torchvision's). Anything but a baseline or
progressive JPEG in L or RGB (PNG, WebP, CMYK, ...) returns None and takes the general path.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.data.reader import BadSample
from pipeline.data.transforms import AugmentConfig

_DRAFT_SCALES = (8, 4, 2)


class CropDecoder:
    """JPEG bytes -> uint8 [3, img_size, img_size], the train crop of ``transforms.crop_transform``
    decoded at the smallest DCT scale that keeps it sharp; None when the image is not a plain JPEG."""

    def __init__(self, cfg: AugmentConfig, img_size: int, max_pixels: int, draft: bool = True) -> None:
        self.img_size = img_size
        self.max_pixels = max_pixels
        self.draft = draft
        self._crop = v2.RandomResizedCrop(img_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio)
        self._flip = cfg.hflip
        self._resample = Image.Resampling.BICUBIC if cfg.interpolation == "bicubic" else Image.Resampling.BILINEAR
        self._randaug = (v2.RandAugment(num_ops=cfg.randaug_n, magnitude=cfg.randaug_m)
                         if cfg.randaug_n > 0 and not cfg.randaug_device else None)

    def __call__(self, image_bytes: bytes) -> torch.Tensor | None:
        try:
            image = Image.open(io.BytesIO(image_bytes))
        except Exception:
            return None                       # the general path reports what is wrong with it
        with image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            width, height = image.size
            if width * height > self.max_pixels:
                raise BadSample(f"image too large ({width}x{height} pixels > {self.max_pixels}: "
                                f"decompression bomb?)")
            # a stand-in of the image's shape without its pixels: make_params reads only the size
            box = self._crop.make_params([torch.empty((), dtype=torch.uint8).expand(3, height, width)])
            top, left, h, w = box["top"], box["left"], box["height"], box["width"]
            scale = 1
            if self.draft:
                scale = next((s for s in _DRAFT_SCALES if min(h, w) >= s * self.img_size), 1)
                if scale > 1:
                    image.draft(image.mode, (width // scale, height // scale))
                    scale = round(width / image.size[0])
            try:
                out = image.resize((self.img_size, self.img_size), self._resample,
                                   box=(left / scale, top / scale, (left + w) / scale, (top + h) / scale))
            except Exception as exc:
                raise BadSample(f"corrupt image ({type(exc).__name__})") from exc
        if self._flip > 0 and not torch.rand(1) >= self._flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self._randaug is not None:
            out = self._randaug(out)
        if out.mode != "RGB":
            out = out.convert("RGB")
        return torch.from_numpy(np.asarray(out).transpose(2, 0, 1).copy())
