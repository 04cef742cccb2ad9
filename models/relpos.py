"""2-D relative position bias: index, table resizing.

A table for an H x W feature map holds, per head, one learned scalar per relative offset:
shape (num_heads, 2H-1, 2W-1). The bias between query (i, j) and key (i', j') is
``table[:, i - i' + H - 1, j - j' + W - 1]`` (CoAtNet Eq. 3, added to the logits before softmax).
The flattened index below addresses ``table.flatten(1)``; it is the same index timm uses for its
``(R, num_heads)`` tables, so both agree position for position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .coatnet import CoAtNetConfig

RESIZE_MODES = ("bilinear", "bicubic", "nearest")


def table_shape(grid: tuple[int, int]) -> tuple[int, int]:
    """Per-head table shape (2H-1, 2W-1) for an H x W grid."""
    return 2 * grid[0] - 1, 2 * grid[1] - 1


def relative_position_index(grid: tuple[int, int], device: torch.device | str | None = "cpu") -> torch.Tensor:
    """Long tensor (N*N,), N = H*W: flat table position of every (query, key) pair."""
    height, width = grid
    rows, cols = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    rows, cols = rows.flatten(), cols.flatten()
    delta_rows = rows[:, None] - rows[None, :] + height - 1
    delta_cols = cols[:, None] - cols[None, :] + width - 1
    return (delta_rows * (2 * width - 1) + delta_cols).flatten()


def resize_table(table: torch.Tensor, grid: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a (num_heads, 2H-1, 2W-1) table to the table of a new grid.

    Each head's table is treated as an image: ``F.interpolate(mode, align_corners=False)``, which
    for 'bilinear' equals TensorFlow's ``tf.image.resize`` used by the paper's code.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    new_shape = table_shape(grid)
    if tuple(table.shape[-2:]) == new_shape:
        return table
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    resized = F.interpolate(table[None].float(), size=new_shape, mode=mode, **kwargs)[0]
    return resized.to(table.dtype)


DEFAULT_RESIZE_MODE = "bilinear"  # the paper's (and CoAtNetConfig.resize_mode's default)


def _stage_strides(state_dict: dict[str, torch.Tensor], config: "CoAtNetConfig | None") -> dict[int, int]:
    """Output stride of every stage (stem included in the count) by its index in ``stages.<i>``."""
    if config is not None:
        strides, stride = {}, 2
        for i, stage in enumerate(config.stages):
            stride *= stage.stride
            strides[i] = stride
        return strides
    # Without a config, the family's layouts: C-C-T-T (stages 0..3 at 1/4..1/32), or CoAtNet-6/7's
    # split S3 (stage 3: Transformer at 1/16, no pooling; stage 4 at 1/32), told apart by any key.
    if any(key.startswith("stages.4.") for key in state_dict):
        return {0: 4, 1: 8, 2: 16, 3: 16, 4: 32}
    return {0: 4, 1: 8, 2: 16, 3: 32}


def resize_state_dict(state_dict: dict[str, torch.Tensor], img_size: int | tuple[int, int],
                      mode: str | None = None, old_img_size: int | tuple[int, int] | None = None,
                      config: "CoAtNetConfig | None" = None) -> dict[str, torch.Tensor]:
    """A new state dict whose bias tables fit a model built for ``img_size``; identity at equal size.

    ``mode``: interpolation; None takes ``config.resize_mode`` (default 'bilinear').
    ``old_img_size``: the size the state dict was trained at; None derives it from EVERY table
    (its grid times its stage's stride: ``config``'s, else the family's layout) and raises
    ValueError when the tables disagree. ``config`` (the model's): its resize_mode and strides;
    given with ``old_img_size``, every table is checked against that size.
    """
    if mode is None:
        mode = config.resize_mode if config is not None else DEFAULT_RESIZE_MODE
    total_stride = config.total_stride if config is not None else 32
    new_size = _size2(img_size)
    if any(s <= 0 or s % total_stride for s in new_size):
        raise ValueError(f"img_size {new_size} must be positive and divisible by {total_stride}")
    tables = {k: v for k, v in state_dict.items() if k.endswith("relative_position_bias_table")}
    if not tables:
        return dict(state_dict)
    grids = {k: ((v.shape[-2] + 1) // 2, (v.shape[-1] + 1) // 2) for k, v in tables.items()}
    strides = {k: _stage_strides(state_dict, config).get(_stage_index(k)) for k in tables}
    if old_img_size is None:
        derived = {}
        for key, grid in grids.items():
            if strides[key] is None:
                raise ValueError(f"no stage stride for {key}; pass old_img_size or config")
            derived[key] = (grid[0] * strides[key], grid[1] * strides[key])
        sizes = set(derived.values())
        if len(sizes) != 1:
            raise ValueError(f"the bias tables imply different image sizes {sorted(sizes)}; pass old_img_size")
        old_size = sizes.pop()
    else:
        old_size = _size2(old_img_size)
    resized = dict(state_dict)
    for key, table in tables.items():
        grid = grids[key]
        new_grid = (grid[0] * new_size[0] // old_size[0], grid[1] * new_size[1] // old_size[1])
        if old_img_size is not None and config is not None and strides[key] is not None and \
                (grid[0] * strides[key], grid[1] * strides[key]) != old_size:
            raise ValueError(f"{key}: a {grid} grid does not belong to a {old_size} image")
        resized[key] = resize_table(table, new_grid, mode)
    return resized


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _stage_index(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "stages" and parts[1].isdigit() else None
