"""RandAugment with the TF reference's semantics (pipeline.data.randaug): the per-sample path (loader
workers, PIL) and the batched path (training device) draw the same ops with the same values at the
same frequencies, and every op agrees with the reference's formulas written out independently here
(numpy, from tensorflow/tpu efficientnet autoaugment.py)."""
from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chi2_contingency
from torchvision.transforms import v2

from pipeline.data import AugmentConfig
from pipeline.data.randaug import BatchRandAugment, RandAugment, apply_draws, apply_op, cutout
from pipeline.data.transforms import crop_transform

# ---------------------------------------------------------------------------------------------
# The reference, written out: level_to_arg (values) and the op functions, in numpy
# ---------------------------------------------------------------------------------------------

REF_OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
           "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd"]


def ref_values(level: float) -> dict[str, tuple[float, bool]]:
    """(unsigned value, randomly negated) per op at ``level`` (_MAX_LEVEL = 10, no clamp)."""
    f = level / 10.0
    enhance = f * 1.8 + 0.1
    return {"AutoContrast": (0, False), "Equalize": (0, False), "Invert": (0, False),
            "Rotate": (f * 30.0, True), "Posterize": (int(f * 4), False), "Solarize": (int(f * 256), False),
            "SolarizeAdd": (int(f * 110), False), "Color": (enhance, False), "Contrast": (enhance, False),
            "Brightness": (enhance, False), "Sharpness": (enhance, False), "ShearX": (f * 0.3, True),
            "ShearY": (f * 0.3, True), "Cutout": (int(f * 40), False), "TranslateX": (f * 100, True),
            "TranslateY": (f * 100, True)}


def _blend(image1, image2, factor):
    image1, image2 = image1.astype(np.float32), image2.astype(np.float32)
    temp = image1 + factor * (image2 - image1)
    return np.clip(temp, 0, 255).astype(np.uint8)          # tf.cast truncates


def _gray(image):
    g = image[..., 0] * 0.2989 + image[..., 1] * 0.5870 + image[..., 2] * 0.1140
    return np.repeat(np.floor(g)[..., None], 3, -1)


def _equalize_channel(ch):
    hist = np.bincount(ch.ravel(), minlength=256)
    nonzero = hist[hist != 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if step == 0:
        return ch
    lut = (np.cumsum(hist) + step // 2) // step
    lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255)
    return lut[ch].astype(np.uint8)


def _autocontrast_channel(ch):
    lo, hi = float(ch.min()), float(ch.max())
    if hi <= lo:
        return ch
    scale = 255.0 / (hi - lo)
    return np.clip(ch * scale - lo * scale, 0, 255).astype(np.uint8)


def _project(image, inverse):
    """Nearest-neighbour projective transform as tf.contrib.image.transform: output (x, y) reads
    input at inverse(x, y), rounded; outside -> 128 (the reference's replace value)."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx, sy = inverse(xs, ys)
    sx, sy = np.round(sx).astype(int), np.round(sy).astype(int)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    out = np.full_like(image, 128)
    out[inside] = image[sy[inside], sx[inside]]
    return out


def reference_op(image: np.ndarray, op: str, value: float, center=None) -> np.ndarray:
    """The reference's op on an HWC uint8 image."""
    if op == "AutoContrast":
        return np.stack([_autocontrast_channel(image[..., c]) for c in range(3)], -1)
    if op == "Equalize":
        return np.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)
    if op == "Invert":
        return 255 - image
    if op == "Posterize":
        shift = 8 - int(value)
        return ((image >> shift) << shift).astype(np.uint8)
    if op == "Solarize":
        return np.where(image < value, image, 255 - image)
    if op == "SolarizeAdd":
        return np.where(image < 128, np.clip(image.astype(int) + int(value), 0, 255), image).astype(np.uint8)
    if op == "Color":
        return _blend(_gray(image), image, value)
    if op == "Brightness":
        return _blend(np.zeros_like(image), image, value)
    if op == "Contrast":        # the grayscale mean (the reference's sum(hist)/256 is a known bug)
        return _blend(np.full_like(image, _gray(image)[..., 0].mean(), dtype=np.float32), image, value)
    if op == "Sharpness":
        k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
        img = image.astype(np.float32)
        blurred = sum(k[i, j] * img[i:i + img.shape[0] - 2, j:j + img.shape[1] - 2]
                      for i in range(3) for j in range(3))
        degenerate = image.copy()
        degenerate[1:-1, 1:-1] = np.clip(blurred, 0, 255).astype(np.uint8)
        return _blend(degenerate, image, value)
    if op == "TranslateX":      # translate(image, [-pixels, 0]): output(x) = input(x + pixels)
        return _project(image, lambda x, y: (x + value, y))
    if op == "TranslateY":
        return _project(image, lambda x, y: (x, y + value))
    if op == "ShearX":          # transform [1, level, 0, 0, 1, 0, 0, 0]
        return _project(image, lambda x, y: (x + value * y, y))
    if op == "ShearY":
        return _project(image, lambda x, y: (x, value * x + y))
    if op == "Rotate":          # angles_to_projective_transforms, counter-clockwise
        h, w = image.shape[:2]
        a = math.radians(value)
        cos, sin = math.cos(a), math.sin(a)
        xo = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2
        yo = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2
        return _project(image, lambda x, y: (cos * x - sin * y + xo, sin * x + cos * y + yo))
    if op == "Cutout":
        h, w = image.shape[:2]
        cy, cx = center
        out = image.copy()
        out[max(0, cy - int(value)):min(h, cy + int(value)), max(0, cx - int(value)):min(w, cx + int(value))] = 128
        return out
    raise KeyError(op)


def _image(seed: int, size: int = 48) -> torch.Tensor:
    """A photograph-like uint8 [3, H, W]: smooth gradients and blobs plus noise (not uniform noise,
    whose histogram ops are degenerate)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([x * 180 + 30, y * 150 + 50, (x + y) * 60 + 40])
    blob = 60 * torch.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) / 0.02)
    noise = torch.randn((3, size, size), generator=g) * 12
    return (base + blob + noise).clamp(0, 255).to(torch.uint8)


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------
# Values and frequencies: per-sample path vs batched path vs the reference's table
# ---------------------------------------------------------------------------------------------

class _RecordingRandAugment(RandAugment):
    """The per-sample RandAugment, recording the draws it applies."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.draws = []

    def sample(self, height, width):
        draws = super().sample(height, width)
        self.draws += draws
        return draws


@pytest.mark.parametrize("magnitude", [5, 15])
def test_both_paths_draw_the_reference_values_at_the_same_frequencies(magnitude):
    n_images, size = 2000, 32
    per_sample = _RecordingRandAugment(2, magnitude)
    torch.manual_seed(0)
    image = Image.new("RGB", (size, size), (90, 120, 150))
    for _ in range(n_images):
        per_sample(image)
    batched = BatchRandAugment(2, magnitude).sample(n_images, size, size, torch.Generator().manual_seed(1))
    ours = collections.Counter((d.op, round(d.value, 6)) for d in per_sample.draws)
    theirs = collections.Counter((d.op, round(d.value, 6)) for row in batched for d in row)

    expected = set()
    for op, (value, signed) in ref_values(magnitude).items():
        expected |= {(op, round(value, 6)), (op, round(-value, 6))} if signed else {(op, round(value, 6))}
    assert set(ours) == set(theirs) == expected                  # the reference's 16 ops and values
    cells = sorted(expected)
    _, p_value, _, _ = chi2_contingency([[ours[c] for c in cells], [theirs[c] for c in cells]])
    assert p_value > 1e-3, p_value                               # the same frequencies (fixed seeds)
    for counter in (ours, theirs):
        by_op = collections.Counter(op for op, _ in counter.elements())
        total = sum(by_op.values())
        assert set(by_op) == set(REF_OPS)
        assert max(abs(c / total - 1 / 16) for c in by_op.values()) < 0.015     # uniform over 16
        for op, (value, signed) in ref_values(magnitude).items():
            if signed:       # +/- at 1/2 each
                plus = counter[(op, round(value, 6))]
                assert abs(plus / by_op[op] - 0.5) < 0.1, op
    centers = [d.center for row in batched for d in row if d.op == "Cutout"]
    assert min(c[0] for c in centers) == 0 and max(c[0] for c in centers) == size - 1    # uniform centre


def test_levels_above_ten_are_not_clamped():
    draws = BatchRandAugment(1, 15, ops=["Rotate"]).sample(50, 8, 8, torch.Generator().manual_seed(0))
    assert {abs(row[0].value) for row in draws} == {45.0}        # timm/torchvision would give 30 / 15
    draws = BatchRandAugment(1, 20, ops=["Color"]).sample(5, 8, 8, torch.Generator().manual_seed(0))
    assert [row[0].value for row in draws] == pytest.approx([3.7] * 5)


def test_randaug_ops_chooses_by_reference_name():
    cfg = AugmentConfig(randaug_ops=["Cutout", "Rotate"])
    assert cfg.randaug_ops == ("Rotate", "Cutout")                # the reference's order
    draws = BatchRandAugment(2, 10, cfg.randaug_ops).sample(200, 8, 8, torch.Generator().manual_seed(0))
    assert {d.op for row in draws for d in row} == {"Rotate", "Cutout"}
    assert AugmentConfig().randaug_ops == tuple(REF_OPS)
    with pytest.raises(ValueError, match="Identity"):
        AugmentConfig(randaug_ops=["Identity"])


def test_bad_randaug_ops_is_a_one_line_config_error():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.augment.*unknown RandAugment op\(s\) \['Identity'\]"):
        load_config("configs/demo.yaml", ["data.augment.randaug_ops=[Rotate, Identity]"])
    cfg = load_config("configs/demo.yaml", ["data.augment.randaug_ops=[Rotate, Invert]", "data.augment.randaug_m=12.5"])
    assert cfg.data.augment.randaug_ops == ("Invert", "Rotate") and cfg.data.augment.randaug_m == 12.5


# ---------------------------------------------------------------------------------------------
# Pixels: each op against the reference's formulas; the PIL path against the tensor path
# ---------------------------------------------------------------------------------------------

EXACT = {"Invert", "Posterize", "Solarize", "SolarizeAdd", "Equalize", "TranslateX", "TranslateY", "Cutout"}
ENHANCE = {"AutoContrast", "Color", "Brightness", "Contrast", "Sharpness"}
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}


def _enhance_tolerance(op: str, factor: float) -> float:
    """Grey levels: rounding (torchvision) vs truncation (the reference's tf.cast) of an
    intermediate image differs by one level, which the blend scales by |factor - 1| (Sharpness'
    blurred image; Color's grayscale through PIL)."""
    return 1 + (abs(factor - 1) if op in ("Sharpness", "Color") else 0)


@pytest.mark.parametrize("level", [5, 15, 20])
@pytest.mark.parametrize("op", REF_OPS)
def test_each_op_matches_the_reference_formula(op, level):
    value, signed = ref_values(level)[op]
    image = _image(level, 256 if op in GEOMETRIC else 48)     # translations of up to 200 px
    for v in ((value, -value) if signed else (value,)):
        if op == "Cutout":
            got = cutout(image[None], int(v), [(7, 40)])[0]
            want = reference_op(_hwc(image), op, v, center=(7, 40))
        else:
            got = apply_op(image, op, v)
            want = reference_op(_hwc(image), op, v)
        diff = np.abs(_hwc(got).astype(int) - want.astype(int))
        if op in EXACT:
            assert diff.max() == 0, (op, v)
        elif op in ENHANCE:
            assert diff.max() <= _enhance_tolerance(op, v), (op, v, diff.max())
        else:      # Rotate, Shear: nearest sampling in float32 (torch) vs float64 (here): a source
            # coordinate within rounding of a .5 boundary may take the neighbour
            assert (diff > 0).mean() < 0.01, (op, v, (diff > 0).mean())
        identity = (op in ("Color", "Contrast", "Brightness", "Sharpness") and v == 1.0
                    or op == "Solarize" and v > 255 or op == "Posterize" and v >= 8)
        assert torch.equal(got, image) == identity, (op, v)


@pytest.mark.parametrize("op", REF_OPS)
def test_the_pil_path_agrees_with_the_tensor_path(op):
    """The loader workers apply the ops on PIL images, the device on tensors."""
    image = _image(3, 256 if op in GEOMETRIC else 48)
    value, signed = ref_values(15)[op]
    value = -value if signed else value
    center = (20, 11) if op == "Cutout" else None
    from pipeline.data.randaug import Draw

    draws = [Draw(op, value, center)]
    on_tensor = apply_draws(image, draws)
    on_pil = v2.functional.pil_to_tensor(apply_draws(v2.functional.to_pil_image(image), draws))
    diff = (on_tensor.int() - on_pil.int()).abs()
    if op in GEOMETRIC:        # PIL's nearest rounds some boundary coordinates the other way
        assert (diff > 0).float().mean() < 0.03, (diff > 0).float().mean()
    else:
        assert diff.max() <= _enhance_tolerance(op, value) + (op == "Color"), (op, diff.max())


def test_batched_randaugment_applies_each_images_own_draws():
    images = torch.stack([_image(s, 24) for s in range(40)])
    augment = BatchRandAugment(2, 15)
    draws = augment.sample(len(images), 24, 24, torch.Generator().manual_seed(2))
    out = augment.apply(images, draws)
    assert out.dtype == torch.uint8 and not torch.equal(out, images)
    for image, ops, got in zip(images, draws, out):
        assert torch.equal(got, apply_draws(image, ops)), ops


def test_the_loaders_per_sample_transform_runs_the_reference_randaugment():
    cfg = AugmentConfig(randaug_n=2, randaug_m=15, randaug_ops=["Invert"], hflip=0.0, crop_scale=(1.0, 1.0),
                        crop_ratio=(1.0, 1.0))
    image = _image(5, 32)
    torch.manual_seed(0)
    assert torch.equal(crop_transform(cfg, 32, train=True)(image), image)        # inverted twice
    cfg = AugmentConfig(randaug_n=1, randaug_m=10, randaug_ops=["Solarize"], hflip=0.0, crop_scale=(1.0, 1.0),
                        crop_ratio=(1.0, 1.0))
    assert torch.equal(crop_transform(cfg, 32, train=True)(image), image)        # threshold 256: no-op
