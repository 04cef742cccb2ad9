"""Bad data never kills a run and never loops: odd image modes are converted, every per-sample
failure is skipped and counted, whole bad shards are skipped before use, storage errors retried
for a while, the writer finishes a split around bad inputs, and a resume never meets a failure
it already counted."""
from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import jpeg, write_index

import pipeline.data.loader as loader_module
import pipeline.data.reader as reader_module
from pipeline.data import (AugmentConfig, DataError, RetryPolicy, ShardIndex, ShardOptions,
                           StreamingLoader, iter_shard_samples, write_demo_shards, write_shards)

NO_AUG = AugmentConfig.off()


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _odd_modes() -> dict[str, bytes]:
    grey16 = Image.fromarray(np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)
    assert grey16.mode == "I;16"
    return {
        "grey16": _encoded(grey16, "PNG"),
        "cmyk": _encoded(Image.new("CMYK", (10, 10), (0, 200, 200, 0)), "JPEG"),
        "palette": _encoded(Image.new("RGB", (10, 10), (200, 30, 30)).convert("P"), "PNG"),
        "grey": _encoded(Image.new("L", (10, 10), 90), "JPEG"),
        "rgba": _encoded(Image.new("RGBA", (10, 10), (10, 200, 10, 128)), "PNG"),
        "la": _encoded(Image.new("LA", (10, 10), (50, 255)), "PNG"),
    }


def _loader(index, **kw) -> StreamingLoader:
    return StreamingLoader(index, batch_size=4, img_size=16, num_workers=0, train=False,
                           augment=NO_AUG, **kw)


def test_odd_image_modes_become_8_bit_rgb(tmp_path):
    samples = [(name, {"png" if data[:4] == b"\x89PNG" else "jpg": data, "cls": b"0"})
               for name, data in _odd_modes().items()]
    index = write_index(tmp_path, [samples])
    loader = _loader(index, max_skip_fraction=0.0)
    batches = list(loader)
    assert sorted(k for b in batches for k in b.keys) == sorted(_odd_modes())
    assert loader.stats.skipped == 0
    assert all(b.images.shape[1:] == (3, 16, 16) and torch.isfinite(b.images).all() for b in batches)


def test_transform_and_shape_failures_are_skipped_with_shard_and_key(tmp_path, monkeypatch):
    good = [(f"g{i}", {"jpg": jpeg(10 * i), "cls": b"1"}) for i in range(6)]
    odd = [("wide", {"png": _encoded(Image.new("RGB", (30, 10)), "PNG"), "cls": b"1"}),
           ("tall", {"png": _encoded(Image.new("RGB", (10, 30)), "PNG"), "cls": b"1"})]
    index = write_index(tmp_path, [good[:3] + odd + good[3:]])
    real = loader_module.crop_transform

    def fussy(cfg, img_size, train):
        inner = real(cfg, img_size, train)

        def transform(image):
            if image.shape[-1] == 30:
                raise RuntimeError("boom")
            if image.shape[-2] == 30:
                return image[:, :5]           # a wrong shape: torch.stack would fail on it
            return inner(image)
        return transform

    monkeypatch.setattr(loader_module, "crop_transform", fussy)
    loader = _loader(index, max_skip_fraction=0.5)
    assert sorted(k for b in loader for k in b.keys) == [f"g{i}" for i in range(6)]
    reasons = {s.key: s.reason for s in loader.stats.skipped_samples}
    assert reasons["wide"].startswith("transform failed (RuntimeError: boom)")
    assert reasons["tall"].startswith("transform gave (3, 5, 10)")
    assert {s.shard for s in loader.stats.skipped_samples} == {"shard-000000.tar"}


def test_image_too_large_for_the_pixel_budget_is_skipped(tmp_path):
    index = write_index(tmp_path, [[("big", {"jpg": jpeg(5), "cls": b"0"}),
                                    *[(f"ok{i}", {"png": _encoded(Image.new("RGB", (8, 8)), "PNG"),
                                                  "cls": b"0"}) for i in range(3)]]])
    loader = _loader(index, max_skip_fraction=0.5, max_image_pixels=100)   # 12x12 > 100 > 8x8
    assert sorted(k for b in loader for k in b.keys) == ["ok0", "ok1", "ok2"]
    assert loader.stats.skipped_samples[0].reason.startswith("image too large (12x12 pixels")


@pytest.fixture
def demo30(tmp_path) -> ShardIndex:
    write_demo_shards(str(tmp_path), num_train=30, num_val=0, image_size=16, samples_per_shard=10)
    return ShardIndex.load(str(tmp_path / "train"))


def _flip_a_label(path: Path) -> None:
    data = bytearray(path.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar if m.name.endswith(".cls"))
    data[member.offset_data] = ord("0") if data[member.offset_data] != ord("0") else ord("1")
    path.write_bytes(bytes(data))


def _stop_and_resume(index, stop_after: int, **kw) -> tuple[list[str], StreamingLoader, StreamingLoader]:
    first = _loader(index, **kw)
    keys = [k for _, b in zip(range(stop_after), first) for k in b.keys]
    resumed = _loader(index, **kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    keys += [k for b in resumed for k in b.keys]
    return keys, first, resumed


def test_checksum_mismatch_skips_the_shard_before_use_and_a_resume_goes_past_it(demo30):
    _flip_a_label(Path(demo30.shard_url(0)))
    keys, first, resumed = _stop_and_resume(demo30, 3, max_skip_fraction=0.5)
    assert sorted(keys) == [f"{i:09d}" for i in range(10, 30)]     # nothing of shard 0 was used
    assert first.stats.skipped == 10 and resumed.stats.skipped == 0
    assert all(s.reason.startswith("checksum mismatch for shard") and "skipped whole" in s.reason
               for s in first.stats.skipped_samples)


def test_corrupt_tar_header_is_reported_as_such_and_not_met_again(demo30, tmp_path):
    path = Path(demo30.shard_url(1))
    data = bytearray(path.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = [m for m in tar][8]                       # the header of sample 14's image
    data[member.offset:member.offset + 100] = b"\x07" * 100
    path.write_bytes(bytes(data))
    keys, first, resumed = _stop_and_resume(demo30, 5, max_skip_fraction=0.5, verify_checksums=False)
    assert sorted(keys) == [f"{i:09d}" for i in range(30) if not 14 <= i < 20]
    assert first.stats.skipped == 6 and resumed.stats.skipped == 0
    assert all(s.reason.startswith("corrupt tar header after sample 4") for s in first.stats.skipped_samples)


def test_storage_errors_are_retried_for_the_configured_time(demo30, monkeypatch):
    real_open = reader_module.open_file
    failures = {"left": 3}

    def flaky(url, *a, **k):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("connection reset")
        return real_open(url, *a, **k)

    monkeypatch.setattr(reader_module, "open_file", flaky)
    quick = RetryPolicy(initial_delay_s=0.01, max_delay_s=0.02, timeout_s=5)
    keys = [k for b in _loader(demo30, retry=quick) for k in b.keys]
    assert sorted(keys) == [f"{i:09d}" for i in range(30)]

    failures["left"] = 10**9                                   # down for good
    loader = _loader(demo30, retry=RetryPolicy(initial_delay_s=0.05, max_delay_s=0.1, timeout_s=0.6),
                     max_skip_fraction=1.0)
    started = time.monotonic()
    batches = list(loader)                   # every step still comes, empty: the run goes on
    assert len(batches) == len(loader) and all(len(b) == 0 for b in batches)
    assert time.monotonic() - started >= 0.5 * 3 and loader.stats.retries >= 3 * 4
    assert loader.stats.skipped == 30
    assert "shard failed to open or read (ConnectionError" in loader.stats.skipped_samples[0].reason
    assert RetryPolicy().timeout_s >= 60 and RetryPolicy().attempts is None


def test_writer_skips_unreadable_images_and_decompression_bombs(tmp_path, monkeypatch):
    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(src / f"{i}.png")
    Image.new("RGB", (64, 64)).save(src / "bomb.png")
    (src / "cut.jpg").write_bytes(jpeg(3)[:40])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)     # 64x64 > 2 x 1000: a "bomb"
    summary = write_shards(str(tmp_path / "src"), str(tmp_path / "out"),
                           options=ShardOptions(samples_per_shard=2, num_workers=1, progress=False))
    reasons = {Path(s.source).name: s.reason for s in summary.skipped}
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert reasons["cut.jpg"].startswith("corrupt or unsupported image")
    assert ShardIndex.load(str(tmp_path / "out" / "train")).num_samples == 4


def test_iter_shard_samples_reads_a_shard_and_verifies_it(demo30):
    url, sha = demo30.shard_url(2), demo30.shards.sha256_hex(2)
    samples = list(iter_shard_samples(url, sha256=sha))
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(20, 30)]
    assert samples[0].image == samples[0].files["jpg"] and "cls" in samples[0].files
    with pytest.raises(DataError, match="checksum mismatch"):
        next(iter_shard_samples(url, sha256="0" * 64))
