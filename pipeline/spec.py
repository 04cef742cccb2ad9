"""What a trained model is and how to feed it, independent of the training config: ``ModelSpec``
(variant, classes, resolution, preprocessing) and the preprocessing and top-k decoding that every
consumer uses (the served pyfunc, batch prediction, evaluation).

Stored next to the weights of every logged model (``spec.json``, and the MLmodel metadata), so a
model can be rebuilt and fed without the config that trained it.
"""
from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import PipelineError

SPEC_FORMAT = 1


class SpecError(PipelineError):
    """A spec that cannot describe or build a model."""


@dataclass
class ModelSpec:
    """What a logged model is, and how to feed it. JSON-able; stored next to the weights."""

    variant: str
    num_classes: int
    img_size: tuple[int, int]
    overrides: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875          # eval: resize the shorter side to size / crop_pct, centre crop
    interpolation: str = "bilinear"
    label_type: str = "single"
    format: int = SPEC_FORMAT

    def __post_init__(self):
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = tuple(int(x) for x in self.img_size)
        self.mean = tuple(float(x) for x in self.mean)
        self.std = tuple(float(x) for x in self.std)
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise SpecError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        if int(d.get("format", SPEC_FORMAT)) > SPEC_FORMAT:
            raise SpecError(f"model spec format {d.get('format')} is newer than this code ({SPEC_FORMAT})")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_model(cls, model, variant: str, class_names: Sequence[str] | None = None,
                   overrides: dict | None = None, **kw) -> "ModelSpec":
        return cls(variant=variant, num_classes=int(model.num_classes), img_size=tuple(model.img_size),
                   overrides=dict(overrides or {}), class_names=list(class_names or []), **kw)

    @classmethod
    def for_data(cls, model, variant: str, index, augment=None, overrides: dict | None = None) -> "ModelSpec":
        """Spec of a model trained on ``index`` (ShardIndex) with ``augment`` (AugmentConfig)."""
        from pipeline.data import AugmentConfig

        a = augment or AugmentConfig()
        return cls.from_model(model, variant, class_names=list(index.class_names), overrides=overrides,
                              mean=tuple(a.mean), std=tuple(a.std), crop_pct=a.eval_crop_pct,
                              interpolation=a.interpolation, label_type=index.label_type)

    def build(self, device=None):
        """A freshly initialised network of this spec (weights not loaded); ``device="meta"``: shapes
        only, no memory (checking weights against it from their headers)."""
        import models

        try:
            return models.create_model(self.variant, num_classes=self.num_classes,
                                       img_size=self.img_size, device=device, **self.overrides)
        except (ValueError, KeyError, TypeError) as e:
            raise SpecError(f"cannot build model {self.variant!r} from its spec: {e}") from None


def spec_augment(spec: "ModelSpec"):
    """The pipeline.data AugmentConfig whose eval transform is this model's preprocessing."""
    from pipeline.data import AugmentConfig

    return AugmentConfig(eval_crop_pct=spec.crop_pct, interpolation=spec.interpolation,
                         mean=tuple(spec.mean), std=tuple(spec.std))


def to_uint8_chw(image):
    """bytes / path / PIL image / HWC array -> uint8 [3,H,W] tensor (decoded as the loader does)."""
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    if isinstance(image, (str, os.PathLike)):
        import fsspec

        with fsspec.open(str(image), "rb") as f:
            image = f.read()
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            return decode_image(torch.frombuffer(bytearray(image), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:  # formats torchvision cannot decode (gif, bmp, tiff): PIL
            image = Image.open(io.BytesIO(bytes(image)))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1)


def preprocess(images: Iterable, spec: "ModelSpec"):
    """Images (encoded bytes, paths/URLs, PIL images or HWC uint8 arrays) -> float [B,3,H,W].

    Exactly the eval transform of pipeline.data (resize to size/crop_pct, centre crop, normalise)
    with the spec's settings, so served inputs see what validation saw during training.
    """
    import torch
    from pipeline.data.transforms import sample_transform

    h, w = spec.img_size
    if h != w:
        raise SpecError(f"non-square img_size {spec.img_size} is not supported by the data transforms")
    tf = sample_transform(spec_augment(spec), h, train=False)
    return torch.stack([tf(to_uint8_chw(im)) for im in images])


def top_k(logits, spec: ModelSpec, k: int = 5) -> list[dict]:
    """Logits [B,C] -> one dict per image: label, class_id, score, top_k_labels, top_k_scores."""
    import torch

    probs = torch.sigmoid(logits) if spec.label_type == "multi" else torch.softmax(logits.float(), -1)
    k = max(1, min(int(k), probs.shape[-1]))
    scores, ids = probs.topk(k, dim=-1)
    rows = []
    for s, i in zip(scores.tolist(), ids.tolist()):
        rows.append({"label": spec.class_names[i[0]], "class_id": int(i[0]), "score": float(s[0]),
                     "top_k_labels": [spec.class_names[j] for j in i], "top_k_scores": [float(v) for v in s]})
    return rows
