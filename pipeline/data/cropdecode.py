"""Crop-aware JPEG decode for training: RandomResizedCrop's box is drawn from the header's size
first; when the box is at least 2x the output per side, PIL decodes the JPEG DCT-scaled
(``Image.draft``: 1/2, 1/4 or 1/8 of the pixels per side, chosen so the box keeps at least
``img_size`` pixels per side, i.e. the final resize still shrinks); otherwise torchvision's
decoder (libjpeg-turbo, faster than PIL's at full size) decodes it whole. The box is then resized
by torchvision's antialiased kernel on the channels-last decode (its fast uint8 path; after DCT
scaling, by PIL's, which takes the fractional box); flip and,
unless it runs per batch, RandAugment (on PIL, as ``transforms.crop_transform``) follow.

The random draws are the same calls on torch's generator, in the same order as ``transforms.crop_transform``
(RandomResizedCrop.make_params, RandomHorizontalFlip, RandAugment), so for a seed the crop box,
flip and RandAugment ops are exactly those of the general path; without DCT scaling the pixels
are identical too. Anything but a JPEG in L or RGB (PNG, WebP, CMYK, ...), or one that fails to
decode, returns None and takes the general path, which reports it.

Off by default (``StreamingLoader(crop_decode=True)`` turns it on): measured on q90 photographs,
DCT scaling saves little because Huffman decoding dominates - 0.60 -> 0.56 ms at 1/2 scale for a
500x375 image, 7.5 -> 4.8 ms at 1/8 for a 2000x1500 one - and at 224 px the boxes of 500x375
images are never 2x the output. Capping the stored size (``make_shards --max-side``) is the lever
that pays; this helps only for large stored images trained at a low resolution.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline.data.reader import BadSample
from pipeline.data.transforms import AugmentConfig, randaugment

_DRAFT_SCALES = (8, 4, 2)


class CropDecoder:
    """JPEG bytes -> uint8 [3, img_size, img_size], the train crop of ``transforms.crop_transform``,
    decoded at the smallest DCT scale that keeps it sharp; None: use the general path."""

    def __init__(self, cfg: AugmentConfig, img_size: int, max_pixels: int, draft: bool = True) -> None:
        self.img_size = img_size
        self.max_pixels = max_pixels
        self.draft = draft
        self._crop = v2.RandomResizedCrop(img_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio)
        self._flip = cfg.hflip
        bicubic = cfg.interpolation == "bicubic"
        self._interpolation = v2.InterpolationMode.BICUBIC if bicubic else v2.InterpolationMode.BILINEAR
        self._resample = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
        self._randaug = (v2.Compose([v2.ToPILImage(), randaugment(cfg), v2.PILToTensor()])
                         if cfg.randaug_n > 0 and not cfg.randaug_device else None)

    def __call__(self, image_bytes: bytes) -> torch.Tensor | None:
        try:
            image = Image.open(io.BytesIO(image_bytes))      # reads the header only
        except Exception:
            return None
        with image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            width, height = image.size
            if width * height > self.max_pixels:
                raise BadSample(f"image too large ({width}x{height} pixels > {self.max_pixels}: "
                                f"decompression bomb?)")
            # a stand-in with the image's shape and no pixels: make_params reads only the size
            box = self._crop.make_params([torch.empty((), dtype=torch.uint8).expand(3, height, width)])
            top, left, h, w = box["top"], box["left"], box["height"], box["width"]
            scale = next((s for s in _DRAFT_SCALES if min(h, w) >= s * self.img_size), 1) if self.draft else 1
            try:
                if scale > 1:
                    # the scaled box is fractional: PIL's resize takes it exactly (torchvision's
                    # integer box would shift it by up to scale / 2 source pixels)
                    image.draft(image.mode, (width // scale, height // scale))
                    scale = round(width / image.size[0])
                    small = image.resize((self.img_size, self.img_size), self._resample,
                                         box=(left / scale, top / scale, (left + w) / scale, (top + h) / scale))
                    out = torch.from_numpy(np.asarray(small.convert("RGB")).transpose(2, 0, 1).copy())
                else:
                    pixels = decode_image(torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8),
                                          mode=ImageReadMode.RGB)
                    out = F.resized_crop(pixels, top, left, h, w, [self.img_size, self.img_size],
                                         interpolation=self._interpolation, antialias=True)
            except Exception:
                return None
        if self._flip > 0 and not torch.rand(1) >= self._flip:
            out = F.horizontal_flip(out)
        if self._randaug is not None:
            out = self._randaug(out)
        return out.contiguous()
