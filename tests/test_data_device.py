"""uint8 batches out of the loader and the per-batch transform on the training device: the same
batches as the loader's own float path, MixUp targets that still sum to 1, multi-label targets,
and a batched RandAugment drawn from the same distribution as torchvision's per-sample one."""
from __future__ import annotations

import collections

import pytest
import torch
from scipy.stats import chi2_contingency
from torchvision.transforms import v2

from pipeline.data import AugmentConfig, ShardIndex, StreamingLoader, write_demo_shards
from pipeline.data.transforms import BatchRandAugment, DeviceBatchTransform, normalize

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


# --------------------------------------------------------------------------------------------
# Batched RandAugment
# --------------------------------------------------------------------------------------------

class _Recording(v2.RandAugment):
    """torchvision's per-sample RandAugment, recording the (op, magnitude) it applies."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.draws: list[tuple[str, float]] = []

    def _apply_image_or_video_transform(self, image, transform_id, magnitude, interpolation, fill):
        self.draws.append((transform_id, round(magnitude, 6)))
        return image


def test_batched_randaugment_draws_follow_torchvisions_distribution():
    n_images, size = 3000, 32
    reference = _Recording(num_ops=2, magnitude=15)
    torch.manual_seed(0)
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    for _ in range(n_images):
        reference(image)
    ours = BatchRandAugment(2, 15).sample(n_images, size, size, torch.Generator().manual_seed(1))
    drawn = [op for row in ours for op in row]
    theirs, mine = collections.Counter(reference.draws), collections.Counter(
        (name, round(value, 6)) for name, value in drawn)
    assert set(theirs) == set(mine)                    # the same ops with the same signed magnitudes
    cells = sorted(theirs)
    _, p_value, _, _ = chi2_contingency([[theirs[c] for c in cells], [mine[c] for c in cells]])
    assert p_value > 1e-3, p_value                     # the same frequencies (fixed seeds: no flake)
    by_op = collections.Counter(name for name, _ in drawn)
    assert min(by_op.values()) > 0.8 * len(drawn) / 14  # every op near its 1/14 share


def test_batched_randaugment_applies_each_images_own_ops():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8)
    augment = BatchRandAugment(2, 15)
    draws = augment.sample(len(images), 16, 16, torch.Generator().manual_seed(2))
    out = augment.apply(images, draws)
    assert out.dtype == torch.uint8 and not torch.equal(out, images)
    for image, ops, got in zip(images, draws, out):
        expected = image
        for name, value in ops:
            expected = augment._v2._apply_image_or_video_transform(
                expected, name, value, interpolation=augment._v2.interpolation, fill=augment._v2._fill)
        assert torch.equal(got, expected), ops


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
