"""uint8 batches out of the loader and the per-batch transform on the training device: the same
batches as the loader's own float path, MixUp targets that still sum to 1, multi-label targets,
and the batched RandAugment on the device giving the loader's own batches (its ops: test_data_randaug.py)."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from pipeline.data import AugmentConfig, ShardIndex, StreamingLoader, write_demo_shards
from pipeline.data.transforms import DeviceBatchTransform, normalize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MIX = AugmentConfig(randaug_n=0, mixup_alpha=0.8, label_smoothing=0.1)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> ShardIndex:
    root = str(tmp_path_factory.mktemp("single"))
    write_demo_shards(root, num_train=40, num_val=0, image_size=20, samples_per_shard=20)
    return ShardIndex.load(f"{root}/train")


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> ShardIndex:
    root = str(tmp_path_factory.mktemp("multi"))
    write_demo_shards(root, num_train=24, num_val=0, image_size=20, samples_per_shard=12, multi_label=True)
    return ShardIndex.load(f"{root}/train")


def batches(index: ShardIndex, augment: AugmentConfig, output: str, **kw) -> list:
    loader = StreamingLoader(index, batch_size=8, img_size=16, num_workers=0, augment=augment,
                             seed=3, output=output, **kw)
    return list(loader)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("augment", [MIX, AugmentConfig(randaug_n=0, mixup_alpha=0.0, cutmix_alpha=1.0),
                                     AugmentConfig.off()], ids=["mixup", "cutmix", "off"])
def test_uint8_batches_on_the_device_equal_the_float_path(single, augment, device):
    floats = batches(single, augment, "float")
    raw = batches(single, augment, "uint8")
    transform = DeviceBatchTransform(augment, single.num_classes, "single")
    assert [b.keys for b in floats] == [b.keys for b in raw]
    for f, r in zip(floats, raw):
        assert r.images.dtype == torch.uint8 and r.targets is None and r.seed == f.seed
        images, targets = transform(r, device)
        assert images.device.type == device and images.dtype == torch.float32
        torch.testing.assert_close(images.cpu(), f.images, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(targets.cpu(), f.targets, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(targets.sum(1).cpu(), torch.ones(len(r)))
        again = transform(r, device)                   # deterministic for the batch's seed
        assert torch.equal(again[0], images) and torch.equal(again[1], targets)


def test_mixup_on_the_device_is_mixup_of_the_normalised_crops(single):
    """Independently of the loader's code: the output is lam * x + (1 - lam) * x.roll(1) of the
    normalised uint8 crops, with the lam the targets carry."""
    raw = batches(single, MIX, "uint8")[0]
    images, targets = DeviceBatchTransform(MIX, 10, "single")(raw, "cpu")
    x = v2.Normalize(MIX.mean, MIX.std)(raw.images.float() / 255)
    hot = torch.nn.functional.one_hot(raw.labels, 10).float() * 0.9 + 0.01
    lam = next(float((targets[i] - hot[i - 1]) @ (hot[i] - hot[i - 1]) / (hot[i] - hot[i - 1]).square().sum())
               for i in range(len(raw)) if raw.labels[i] != raw.labels[i - 1])
    assert 0 <= lam <= 1
    torch.testing.assert_close(targets, lam * hot + (1 - lam) * hot.roll(1, 0), atol=1e-5, rtol=0)
    torch.testing.assert_close(images, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-4, rtol=0)


def test_multi_label_targets_on_the_device(multi):
    augment = AugmentConfig(randaug_n=0, mixup_alpha=0.8, label_smoothing=0.0)
    floats, raw = batches(multi, augment, "float"), batches(multi, augment, "uint8")
    transform = DeviceBatchTransform(augment, multi.num_classes, "multi")
    for f, r in zip(floats, raw):
        assert r.labels.shape == (len(r), 10) and r.labels.dtype == torch.float32
        images, targets = transform(r, "cpu")
        torch.testing.assert_close(targets, f.targets)
        assert targets.min() >= 0 and targets.max() <= 1
        lam_rows = targets.sum(1) / 1                  # mixed multi-hot: between the two label counts
        counts, rolled = r.labels.sum(1), r.labels.roll(1, 0).sum(1)
        assert ((lam_rows >= torch.minimum(counts, rolled) - 1e-5)
                & (lam_rows <= torch.maximum(counts, rolled) + 1e-5)).all()
    evaluation = DeviceBatchTransform(augment, multi.num_classes, "multi", train=False)
    images, targets = evaluation(raw[0], "cpu")
    assert torch.equal(targets, raw[0].labels)
    torch.testing.assert_close(images, normalize(augment)(raw[0].images))


def test_device_randaugment_batches_equal_the_loaders_own(single):
    augment = AugmentConfig(randaug_n=2, randaug_m=15, mixup_alpha=0.8, randaug_device=True)
    floats, raw = batches(single, augment, "float"), batches(single, augment, "uint8")
    transform = DeviceBatchTransform(augment, single.num_classes, "single")
    for f, r in zip(floats, raw):
        images, targets = transform(r, "cpu")
        torch.testing.assert_close(images, f.images, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(targets, f.targets)


def test_uint8_output_is_validated_and_pins(single):
    with pytest.raises(ValueError, match="output"):
        StreamingLoader(single, batch_size=8, output="half")
    batch = batches(single, AugmentConfig.off(), "uint8")[0]
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned.images.is_pinned() and pinned.images.dtype == torch.uint8 and pinned.targets is None


def test_the_transform_leaves_the_global_random_state_alone(single):
    raw = batches(single, MIX, "uint8")[0]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    DeviceBatchTransform(MIX, 10, "single")(raw, "cpu")
    assert torch.equal(torch.random.get_rng_state(), before)   # dropout etc. in the step unaffected
