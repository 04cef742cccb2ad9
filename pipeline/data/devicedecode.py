"""JPEG decoding on the training device (``StreamingLoader(decode="device")``, config
``data.decode_device: cuda``): a loader worker only reads and parses shards, reads each JPEG's
header (``jpeg_size``: a marker scan, no decode) and draws RandomResizedCrop's box and the flip
from it - the same torchvision calls in the same order as ``transforms.crop_transform``, so for a
seed the boxes and flips are exactly the CPU path's - and hands over the encoded bytes
(``EncodedImages``: back to back in one buffer, with the boxes). ``decode_rows`` then decodes the
batch with ``torchvision.io.decode_jpeg(list, device=...)`` (nvjpeg on CUDA, libjpeg-turbo on the
CPU), crops, resizes (the same antialiased ``resized_crop``) and flips each image, and puts the
rows the worker did decode back in their places.

What the worker still decodes (the general path, reported as always when it fails): anything
that is not a baseline/extended/progressive 8-bit JPEG with 1 or 3 components (PNG, WebP, CMYK,
12-bit, arithmetic-coded), and JPEGs without an end-of-image marker (truncated). On the CPU
(device="cpu") the batch equals the worker path's bit for bit (tested); nvjpeg's IDCT and the
GPU resize round differently, within a few grey levels (benchmarks/device_pipeline.py measures).
A JPEG whose header parses but whose body nvjpeg refuses is decoded alone and, failing that,
becomes a grey (128) image, counted in ``DecodeStats`` - its label stays: the loader has handed
the batch over by then.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline.data.reader import BadSample

# start-of-frame markers nvjpeg and libjpeg-turbo both decode: baseline, extended, progressive
_SOF_OK = {0xC0, 0xC1, 0xC2}
_SOF_ALL = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
GREY = 128


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG this path decodes on the device, from its frame header; None for
    anything else (not a JPEG, other frame types, not 8-bit, neither 1 nor 3 components, no
    end-of-image marker)."""
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data[-64:].rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return None
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:               # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):    # no length
            i += 2
            continue
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker in _SOF_ALL:
            if marker not in _SOF_OK or i + 10 > end:
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", data, i + 4)
            if precision != 8 or components not in (1, 3) or not height or not width:
                return None
            return width, height
        if marker == 0xDA:               # start of scan before any frame header
            return None
        i += 2 + length
    return None


class CropDrawer:
    """In a loader worker: JPEG bytes -> (top, left, height, width, flip) drawn from torch's
    generator exactly as ``transforms.crop_transform`` draws them for an image of that size;
    None: decode this sample in the worker. BadSample for an image over ``max_pixels``."""

    def __init__(self, img_size: int, crop_scale: tuple[float, float], crop_ratio: tuple[float, float],
                 hflip: float, max_pixels: int) -> None:
        self._crop = v2.RandomResizedCrop(img_size, scale=crop_scale, ratio=crop_ratio)
        self._flip = hflip
        self.max_pixels = max_pixels

    def __call__(self, data: bytes) -> tuple[int, int, int, int, bool] | None:
        size = jpeg_size(data)
        if size is None:
            return None
        width, height = size
        if width * height > self.max_pixels:
            raise BadSample(f"image too large ({width}x{height} pixels > {self.max_pixels}: decompression bomb?)")
        # a stand-in with the image's shape and no pixels: make_params reads only the size
        box = self._crop.make_params([torch.empty((), dtype=torch.uint8).expand(3, height, width)])
        flip = self._flip > 0 and not torch.rand(1) >= self._flip      # v2.RandomHorizontalFlip's test
        return box["top"], box["left"], box["height"], box["width"], bool(flip)


@dataclass
class EncodedImages:
    """A batch's JPEGs, not decoded yet: ``data[offsets[i]:offsets[i+1]]`` is the file of batch row
    ``rows[i]``, to be cropped by ``boxes[i]`` (top, left, height, width, flip) to ``img_size``."""
    data: torch.Tensor                  # uint8 [total bytes], in shared memory from a worker
    offsets: list[int]
    rows: list[int]                     # ascending; Batch.images holds the other rows, in order
    boxes: list[tuple[int, int, int, int, bool]]
    img_size: int
    interpolation: str = "bilinear"     # "bilinear" | "bicubic", as AugmentConfig.interpolation

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def pack(files: list[bytes], rows: list[int], boxes: list[tuple[int, int, int, int, bool]],
             img_size: int, interpolation: str) -> EncodedImages:
        """One buffer for all files (written straight into shared memory in a DataLoader worker,
        so handing it over copies nothing more)."""
        offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64).tolist()
        if get_worker_info() is None:
            data = torch.empty(offsets[-1], dtype=torch.uint8)
        else:
            data = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(offsets[-1]))
        view = data.numpy()
        for f, a, b in zip(files, offsets[:-1], offsets[1:]):
            view[a:b] = np.frombuffer(f, dtype=np.uint8)
        return EncodedImages(data, offsets, rows, boxes, img_size, interpolation)


@dataclass
class DecodeStats:
    images: int = 0                     # JPEGs decoded on the device
    failed: int = 0                     # refused by the decoder: grey images
    failed_keys: list[str] = field(default_factory=list)   # the first 100


def _decode_all(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    try:
        return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:                 # one bad file fails the batched call: one at a time
        out: list[torch.Tensor | None] = []
        for f in files:
            try:
                out.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_rows(decoded_rows: torch.Tensor, encoded: EncodedImages | None, device: torch.device | str,
                keys: list[str] | None = None, stats: DecodeStats | None = None,
                non_blocking: bool = True) -> torch.Tensor:
    """The whole uint8 batch [B, 3, S, S] on ``device``: ``encoded`` decoded there, cropped,
    resized and flipped, and the rows decoded in the worker (``decoded_rows``) in between."""
    device = torch.device(device)
    done = decoded_rows.to(device, non_blocking=non_blocking)
    if encoded is None or not len(encoded):
        return done
    size = [encoded.img_size, encoded.img_size]
    interpolation = (v2.InterpolationMode.BICUBIC if encoded.interpolation == "bicubic"
                     else v2.InterpolationMode.BILINEAR)
    files = [encoded.data[a:b] for a, b in zip(encoded.offsets[:-1], encoded.offsets[1:])]
    crops = []
    for i, (image, (top, left, h, w, flip)) in enumerate(zip(_decode_all(files, device), encoded.boxes)):
        if image is None:
            crop = torch.full((3, *size), GREY, dtype=torch.uint8, device=device)
            if stats is not None:
                stats.failed += 1
                if keys is not None and len(stats.failed_keys) < 100:
                    stats.failed_keys.append(keys[encoded.rows[i]])
        else:
            crop = F.resized_crop(image, top, left, h, w, size, interpolation=interpolation, antialias=True)
            crop = F.horizontal_flip(crop) if flip else crop
        crops.append(crop)
    if stats is not None:
        stats.images += len(crops)
    total = len(done) + len(crops)
    encoded_rows = set(encoded.rows)
    worker, device_side = iter(done), iter(crops)
    return torch.stack([next(device_side) if r in encoded_rows else next(worker) for r in range(total)])
