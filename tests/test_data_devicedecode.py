"""JPEG decoding on the device (``decode="device"``), tested on the CPU through the same code path
(device="cpu"): the same batches as the worker-decode path for the same seeds - the same crops and
flips, the same pixels bit for bit (libjpeg-turbo decodes both on the CPU) - with PNG, CMYK and
truncated JPEGs decoded in the worker; the exactly-once, elastic cursor unchanged; what the
config refuses."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.data import AugmentConfig, StreamingLoader
from pipeline.data.devicedecode import GREY, EncodedImages, decode_rows, jpeg_size
from pipeline.data.reader import BadSample
from pipeline.data.transforms import DeviceBatchTransform
from tests.helpers import write_index

AUG = AugmentConfig(randaug_device=True, randaug_n=2, randaug_m=15, mixup_alpha=0.8, label_smoothing=0.1)


def image_bytes(seed: int, size: tuple[int, int], fmt: str = "JPEG", mode: str = "RGB", **kw) -> bytes:
    """Position-coded colours plus noise: a wrong box or flip shows at once."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    rgb = np.stack([x / w * 255, y / h * 255, (x + y + seed * 17) % 256], -1)
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}), **kw)
    return buf.getvalue()


def sample(i: int) -> tuple[str, dict[str, bytes]]:
    """Mostly plain JPEGs of varied sizes; every 5th progressive, every 7th greyscale; every 6th
    a PNG, every 11th CMYK, every 13th truncated: those three are decoded in the worker."""
    size = (24 + (i * 7) % 40, 20 + (i * 11) % 36)
    if i % 13 == 12:
        files = {"jpg": image_bytes(i, size)[:-40]}
    elif i % 11 == 10:
        files = {"jpg": image_bytes(i, size, mode="CMYK")}
    elif i % 6 == 5:
        files = {"png": image_bytes(i, size, fmt="PNG")}
    else:
        files = {"jpg": image_bytes(i, size, mode="L" if i % 7 == 6 else "RGB", progressive=i % 5 == 4)}
    return f"{i:09d}", {**files, "cls": str(i % 3).encode()}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    samples = [sample(i) for i in range(60)]
    return write_index(root, [samples[:25], samples[25:45], samples[45:]])


def make(index, decode: str, **kw) -> StreamingLoader:
    return StreamingLoader(index, **{**dict(batch_size=8, img_size=16, num_workers=0, augment=AUG, seed=5, max_skip_fraction=0.2,
                                            output="uint8", decode=decode), **kw})


def test_jpeg_size_reads_the_frame_header_of_what_the_device_decodes():
    for kw in ({}, {"progressive": True}, {"mode": "L"}):
        data = image_bytes(1, (53, 37), **kw)
        assert jpeg_size(data) == (53, 37) == Image.open(io.BytesIO(data)).size
    assert jpeg_size(image_bytes(1, (53, 37), mode="CMYK")) is None           # 4 components
    assert jpeg_size(image_bytes(1, (53, 37))[:-40]) is None                  # no end-of-image marker
    assert jpeg_size(image_bytes(1, (53, 37), fmt="PNG")) is None
    assert jpeg_size(b"") is None and jpeg_size(b"\xff\xd8\xff\xd9") is None


@pytest.mark.parametrize("device_transform", [False, True], ids=["decode-only", "with-transform"])
def test_device_decode_gives_the_worker_paths_batches(mixed, device_transform):
    worker, device = list(make(mixed, "worker")), list(make(mixed, "device"))
    tf = DeviceBatchTransform(AUG, mixed.num_classes, "single")
    assert [b.keys for b in worker] == [b.keys for b in device]
    assert sum(len(b) for b in worker) < 60                  # truncated JPEGs skipped ...
    assert [[s.key for s in b.skipped] for b in worker] == [[s.key for s in b.skipped] for b in device]
    encoded = sum(len(b.encoded) for b in device if b.encoded is not None)
    in_worker = sum(len(b.images) for b in device)
    assert encoded > 30 and in_worker >= 8, (encoded, in_worker)      # both kinds in the batches
    for w, d in zip(worker, device):
        assert torch.equal(d.labels, w.labels) and d.seed == w.seed
        assert len(d.images) + (len(d.encoded) if d.encoded is not None else 0) == len(d)
        assert torch.equal(d.decoded_images("cpu"), w.images)        # same crops, flips, pixels
        if device_transform:
            (wi, wt), (di, dt) = tf(w, "cpu"), tf(d, "cpu")
            assert torch.equal(di, wi) and torch.equal(dt, wt)
    assert tf.decode_stats.images == (encoded if device_transform else 0) and tf.decode_stats.failed == 0


def test_a_worker_process_hands_the_bytes_over_in_shared_memory(mixed):
    worker = list(make(mixed, "worker", num_workers=1))
    device = list(make(mixed, "device", num_workers=1))
    assert [b.keys for b in worker] == [b.keys for b in device]
    for w, d in zip(worker, device):
        assert torch.equal(d.to("cpu").images, w.images)


def test_the_elastic_cursor_is_unchanged(mixed):
    """Half an epoch with decode="device", resumed at another batch size and worker count: every
    sample exactly once, and the batches after the resume equal the worker path's."""
    first = make(mixed, "device", batch_size=6)
    it = iter(first)
    seen = [k for _ in range(4) for k in next(it).keys]
    state = first.state_dict()
    resumed = {}
    for decode in ("device", "worker"):
        loader = make(mixed, decode, batch_size=5, num_workers=2)
        loader.load_state_dict(state)
        resumed[decode] = list(loader)
    rest = [k for b in resumed["device"] for k in b.keys]
    everything = [k for b in make(mixed, "worker") for k in b.keys]
    assert sorted(seen + rest) == sorted(everything) and len(set(seen + rest)) == len(seen + rest)
    for d, w in zip(resumed["device"], resumed["worker"]):
        assert d.keys == w.keys and torch.equal(d.decoded_images("cpu"), w.images)


def test_an_undecodable_body_becomes_grey_and_is_counted():
    good = image_bytes(0, (30, 20))
    bad = bytearray(good)
    for i in range(len(bad) // 2, len(bad) - 10):            # the header and end marker intact
        bad[i] = 0xFF if i % 7 == 0 else bad[i] ^ 0x5A
    box = (2, 3, 12, 20, False)
    encoded = EncodedImages.pack([good, bytes(bad)], [0, 2], [box, box], 8, "bilinear")
    stats = type(DeviceBatchTransform(AUG, 3, "single").decode_stats)()
    done = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    out = decode_rows(done, encoded, "cpu", keys=["a", "b", "c"], stats=stats)
    assert out.shape == (3, 3, 8, 8) and torch.equal(out[1], done[0])
    assert (out[2] == GREY).all() and not (out[0] == GREY).all()
    assert (stats.images, stats.failed, stats.failed_keys) == (2, 1, ["c"])


def test_a_decompression_bomb_is_refused_in_the_worker(mixed):
    from pipeline.data.devicedecode import CropDrawer

    drawer = CropDrawer(16, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, max_pixels=100)
    with pytest.raises(BadSample, match="too large"):
        drawer(image_bytes(0, (30, 20)))


def test_invalid_combinations_are_refused(mixed):
    for kw, what in [(dict(output="float"), "output='uint8'"), (dict(train=False), "train=True"),
                     (dict(crop_decode=True), "crop_decode"),
                     (dict(augment=AugmentConfig(randaug_device=False)), "randaug_device"),
                     (dict(decode="gpu"), "'worker' or 'device'")]:
        with pytest.raises(ValueError, match=what):
            make(mixed, kw.pop("decode", "device"), **kw)
    make(mixed, "device", augment=AugmentConfig(randaug_n=0))          # no RandAugment: fine
    gpu = ["scaling.use_gpu=true", "data.augment.randaug_device=true", "data.decode_device=cuda"]
    assert load_config(None, gpu).data.decode_device == "cuda"
    for overrides, what in [(gpu[1:], "scaling.use_gpu"),
                            ([gpu[0], gpu[2], "data.augment.randaug_device=false"], "randaug_device"),
                            (gpu + ["data.decode_device=tpu"], "decode_device")]:
        with pytest.raises(ConfigError, match=what):
            load_config(None, overrides)


def test_a_mixture_of_sources_decodes_on_the_device_too(mixed):
    """What the trainer builds for data.sources with data.decode_device=cuda (here on the CPU)."""
    from pipeline.data.mixture import MixedLoader, Source

    def first_batches(decode: str) -> list:
        loader = MixedLoader([Source("a", mixed, 0.5), Source("b", mixed, 0.5)], train=True, batch_size=8,
                             img_size=16, num_workers=0, augment=AUG, seed=5, max_skip_fraction=0.2,
                             output="uint8", decode=decode)
        tf = loader.batch_transform()
        it = iter(loader)
        return [tf(next(it), "cpu") for _ in range(4)]

    for (wi, wt), (di, dt) in zip(first_batches("worker"), first_batches("device")):
        assert torch.equal(di, wi) and torch.equal(dt, wt)
