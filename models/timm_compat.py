"""State-dict mapping to and from timm's paper-config ``coatnet_N_224`` (N = 0..5).

Differences handled here:
- Transformer blocks: timm uses 1x1 convs on NCHW, we use Linear on NHWC (weights squeezed).
- timm's fused qkv is ordered (head, q|k|v, dim_head) ('head_first'); ours is (q|k|v, head, dim_head).
- timm stores a bias table as (R, heads), R = (2H-1)(2W-1); ours is (heads, 2H-1, 2W-1).
- Names: ``shortcut.expand`` -> ``shortcut_proj``; ``norm1.norm`` -> ``norm1`` (downsampling
  Transformer blocks); ``attn.rel_pos.relative_position_bias_table`` -> ``attn.relative_position_bias_table``.
timm state dicts at any resolution load; pass ``img_size`` for non-square tables.
"""

from __future__ import annotations

import math

import torch

_TABLE = "relative_position_bias_table"


def _transformer_blocks(keys: list[str]) -> set[str]:
    return {k.split(".attn.")[0] for k in keys if ".attn." in k}


def _block_of(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:4]) if key.startswith("stages.") else ""


def _table_grid(rows: int, img_size: tuple[int, int] | None) -> tuple[int, int]:
    if img_size is None:
        side = (math.isqrt(rows) + 1) // 2
        if (2 * side - 1) ** 2 != rows:
            raise ValueError(f"bias table with {rows} rows is not square; pass img_size")
        return side, side
    for stride in (8, 16, 32, 64):
        grid = (img_size[0] // stride, img_size[1] // stride)
        if (2 * grid[0] - 1) * (2 * grid[1] - 1) == rows:
            return grid
    raise ValueError(f"no stage grid of a {img_size} image has a bias table with {rows} rows")


def _qkv_order(tensor: torch.Tensor, num_heads: int, head_first_to_ours: bool) -> torch.Tensor:
    rest = tensor.shape[1:]
    dim_head = tensor.shape[0] // (3 * num_heads)
    shape = (num_heads, 3, dim_head) if head_first_to_ours else (3, num_heads, dim_head)
    return tensor.reshape(*shape, *rest).transpose(0, 1).reshape(tensor.shape)


def from_timm_state_dict(state_dict: dict[str, torch.Tensor],
                         img_size: int | tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Convert a timm ``coatnet_N_224`` state dict to ours (load it with ``strict=True``)."""
    size = (img_size, img_size) if isinstance(img_size, int) else img_size
    transformer_blocks = _transformer_blocks(list(state_dict))
    heads = {block: state_dict[f"{block}.attn.rel_pos.{_TABLE}"].shape[1] for block in transformer_blocks}
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        block = _block_of(key)
        new_key = key.replace("shortcut.expand.", "shortcut_proj.").replace("norm1.norm.", "norm1.")
        new_key = new_key.replace(f"attn.rel_pos.{_TABLE}", f"attn.{_TABLE}")
        if block in transformer_blocks:
            if key.endswith(_TABLE):
                grid = _table_grid(value.shape[0], size)
                value = value.t().reshape(value.shape[1], 2 * grid[0] - 1, 2 * grid[1] - 1)
            elif value.ndim == 4:  # 1x1 conv -> Linear
                value = value.flatten(1)
            if ".attn.qkv." in key:
                value = _qkv_order(value, heads[block], head_first_to_ours=True)
        converted[new_key] = value.clone()
    return converted


def to_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert our state dict to timm's ``coatnet_N_224`` layout (CoAtNet-0..5 only)."""
    transformer_blocks = _transformer_blocks(list(state_dict))
    heads = {block: state_dict[f"{block}.attn.{_TABLE}"].shape[0] for block in transformer_blocks}
    downsampling = {block for block in transformer_blocks
                    if block.endswith(".blocks.0") and f"{block}.shortcut_proj.weight" in state_dict}
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        block = _block_of(key)
        new_key = key.replace("shortcut_proj.", "shortcut.expand.")
        if block in transformer_blocks:
            if block in downsampling:
                new_key = new_key.replace(f"{block}.norm1.", f"{block}.norm1.norm.")
            if key.endswith(_TABLE):
                new_key = new_key.replace(f"attn.{_TABLE}", f"attn.rel_pos.{_TABLE}")
                value = value.flatten(1).t()
            else:
                if ".attn.qkv." in key:
                    value = _qkv_order(value, heads[block], head_first_to_ours=False)
                if value.ndim == 2:  # Linear -> 1x1 conv
                    value = value[:, :, None, None]
        converted[new_key] = value.clone()
    return converted
