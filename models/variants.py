"""The CoAtNet family (Tables 3, 11, 12) plus tiny variants for tests and CPU demos."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from .coatnet import CoAtNet, CoAtNetConfig, StageConfig


def _family(name: str, stem: int, depths: tuple[int, ...], widths: tuple[int, ...], drop_path_rate: float,
            dim_head: int = 32, split_s3: bool = False) -> CoAtNetConfig:
    """C-C-T-T config; with split_s3 (CoAtNet-6/7) S3 is MBConv then Transformer at double width."""
    if split_s3:
        stages = (
            StageConfig("C", depths[0], widths[0]),
            StageConfig("C", depths[1], widths[1]),
            StageConfig("C", depths[2], widths[2]),
            StageConfig("T", depths[3], widths[3], stride=1),
            StageConfig("T", depths[4], widths[4]),
        )
    else:
        kinds = ("C", "C", "T", "T")
        stages = tuple(StageConfig(k, d, w) for k, d, w in zip(kinds, depths, widths))
    return CoAtNetConfig(name=name, stem_width=stem, stages=stages, head_hidden_size=widths[-1], dim_head=dim_head,
                         drop_path_rate=drop_path_rate)


# Stochastic-depth defaults: Table 10's ImageNet-1K rates for C-0..3, its ImageNet-21K rate for C-4,
# its JFT fine-tune rate for C-5; the paper gives none for C-6/7 (0.2 is our choice).
VARIANTS: dict[str, CoAtNetConfig] = {
    "coatnet_pico": CoAtNetConfig(
        name="coatnet_pico", stem_width=16,
        stages=(StageConfig("C", 1, 16), StageConfig("C", 1, 32), StageConfig("T", 1, 64), StageConfig("T", 1, 128)),
        head_hidden_size=None, dim_head=16),
    "coatnet_nano": CoAtNetConfig(
        name="coatnet_nano", stem_width=32,
        stages=(StageConfig("C", 1, 32), StageConfig("C", 2, 64), StageConfig("T", 2, 128), StageConfig("T", 1, 256)),
        head_hidden_size=256, dim_head=32, drop_path_rate=0.05),
    "coatnet_0": _family("coatnet_0", 64, (2, 3, 5, 2), (96, 192, 384, 768), 0.2),
    "coatnet_1": _family("coatnet_1", 64, (2, 6, 14, 2), (96, 192, 384, 768), 0.3),
    "coatnet_2": _family("coatnet_2", 128, (2, 6, 14, 2), (128, 256, 512, 1024), 0.5),
    "coatnet_3": _family("coatnet_3", 192, (2, 6, 14, 2), (192, 384, 768, 1536), 0.7),
    "coatnet_4": _family("coatnet_4", 192, (2, 12, 28, 2), (192, 384, 768, 1536), 0.7),
    # timm's coatnet_5_224 uses head size 32; the paper says 64 (pass dim_head=64, or preset="paper").
    "coatnet_5": _family("coatnet_5", 192, (2, 12, 28, 2), (256, 512, 1280, 2048), 0.2),
    "coatnet_6": _family("coatnet_6", 192, (2, 4, 8, 42, 2), (192, 384, 768, 1536, 2048), 0.2,
                         dim_head=128, split_s3=True),
    "coatnet_7": _family("coatnet_7", 192, (2, 4, 8, 42, 2), (256, 512, 1024, 2048, 3072), 0.2,
                         dim_head=128, split_s3=True),
}

# The paper's main-text form: stride on the 1x1 expansion conv (Eq. 5), max pooling (Eq. 4),
# bilinear bias-table resizing; CoAtNet-5 with head size 64; stochastic depth ending at
# rate x (L-1)/L as the TF reference code. BatchNorm eps/momentum stay PyTorch's in both presets
# (the paper states none; the TF reference's 1e-3 / 0.99 are set by the paper recipes, config
# fields model.bn_eps / model.bn_momentum).
PRESETS: dict[str, dict[str, Any]] = {
    "timm": {},
    "paper": {"stride_mode": "expand", "pool": "max", "resize_mode": "bilinear", "drop_path_schedule": "reference"},
}


def list_models() -> list[str]:
    return sorted(VARIANTS)


def get_config(name: str, preset: str = "timm", **overrides: Any) -> CoAtNetConfig:
    """The variant's config with a preset and field overrides applied (ValueError on unknown names)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(CoAtNetConfig)} - {"name"}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown override(s) {sorted(unknown)} for {name}; valid: {sorted(fields)}")
    config = VARIANTS[name]
    changes = dict(PRESETS[preset])
    if preset == "paper" and name == "coatnet_5":
        changes["dim_head"] = 64
    changes.update(overrides)
    return dataclasses.replace(config, **changes)


def create_model(name: str, num_classes: int = 1000, img_size: int | tuple[int, int] = 224,
                 drop_path_rate: float | None = None, grad_checkpointing: bool = False, preset: str = "timm",
                 device: torch.device | str | None = None, **overrides: Any) -> CoAtNet:
    """Build a variant by name. ``preset='paper'`` gives the paper's main-text form; ``overrides``
    replace fields of ``CoAtNetConfig`` (e.g. ``pool='max'``, ``dim_head=64``, ``attn_backend='flex'``).

    ``device``: build the parameters there (default: the current default device). ``"meta"`` gives
    shapes without memory, buffers included (coatnet_7 in about a second); materialise with
    ``model.to_empty(device=...)`` then ``model.init_weights()``.
    """
    config = get_config(name, preset=preset, **overrides)
    with contextlib.nullcontext() if device is None else torch.device(device):
        model = CoAtNet(config, num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path_rate,
                        grad_checkpointing=grad_checkpointing)
    if device is not None:
        model.to(device)  # the relative index is built on the CPU whatever the default device
    return model
