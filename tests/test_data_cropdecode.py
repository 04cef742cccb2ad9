"""Crop-aware JPEG decode: the same crop box, flip and RandAugment draws as the general path for
a seed, the same pixels without DCT scaling and near-equal ones with it, and
everything that is not a plain JPEG left to the general path."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.cropdecode import CropDecoder
from pipeline.data.reader import BadSample, decode_rgb8
from pipeline.data.transforms import AugmentConfig, crop_transform


def photo_like(width: int, height: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """Smooth position-coded colours plus mild texture: a wrong box or flip shows at once."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    rgb = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    rgb = np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format=fmt, quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("randaug_n", [0, 2])
def test_same_draws_and_near_equal_pixels_as_the_general_path(draft, randaug_n):
    cfg = AugmentConfig(randaug_n=randaug_n, randaug_m=9)
    data = photo_like(500, 375)
    fast = CropDecoder(cfg, 32, max_pixels=10**8, draft=draft)
    general = crop_transform(cfg, 32, train=True)
    errors = []
    for seed in range(40):
        torch.manual_seed(seed)
        a = fast(data)
        after_fast = torch.rand(1)
        torch.manual_seed(seed)
        b = general(decode_rgb8(data))
        assert torch.rand(1) == after_fast                # the same random draws were taken
        assert a.shape == b.shape == (3, 32, 32) and a.dtype == torch.uint8
        errors.append((a.float() - b.float()).abs().mean().item())
    if not draft:
        assert max(errors) == 0, errors                    # the very same kernels on the same box
    # RandAugment's geometric ops (nearest) can move a resampling difference by a pixel
    assert np.median(errors) < (1.0 if randaug_n == 0 else 6.0), errors


def test_draft_decodes_fewer_pixels_when_the_crop_is_large():
    data = photo_like(512, 384)
    cfg = AugmentConfig(randaug_n=0, crop_scale=(0.9, 1.0), hflip=0.0)
    torch.manual_seed(0)
    drafted = CropDecoder(cfg, 32, 10**8)(data)
    torch.manual_seed(0)
    full = CropDecoder(cfg, 32, 10**8, draft=False)(data)
    assert (drafted.float() - full.float()).abs().mean() < 1.5


def test_not_a_plain_jpeg_takes_the_general_path_and_bombs_are_refused():
    cfg = AugmentConfig.off()
    decoder = CropDecoder(cfg, 16, max_pixels=10**8)
    assert decoder(photo_like(40, 30, fmt="PNG")) is None
    assert decoder(photo_like(40, 30, mode="CMYK")) is None
    assert decoder(b"not an image") is None
    assert decoder(photo_like(40, 30, mode="L")).shape == (3, 16, 16)
    with pytest.raises(BadSample, match="too large"):
        CropDecoder(cfg, 16, max_pixels=100)(photo_like(40, 30))
    truncated = photo_like(400, 300)[:2000]
    assert decoder(truncated) is None                      # the general path reports it:
    with pytest.raises(BadSample, match="corrupt"):
        decode_rgb8(truncated)


def test_loader_with_crop_aware_decode_gives_the_same_batches(tmp_path):
    from pipeline.data import ShardIndex, StreamingLoader, write_demo_shards

    write_demo_shards(str(tmp_path), num_train=24, num_val=0, image_size=20, samples_per_shard=12)
    index = ShardIndex.load(str(tmp_path / "train"))
    cfg = AugmentConfig(randaug_n=2, randaug_m=9, mixup_alpha=0.0)   # boxes < 2x output: no scaling
    make = lambda crop_decode: list(StreamingLoader(index, batch_size=8, img_size=16, num_workers=0,
                                                    augment=cfg, output="uint8", crop_decode=crop_decode))
    for a, b in zip(make(True), make(False)):
        assert a.keys == b.keys and torch.equal(a.images, b.images)
