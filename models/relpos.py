"""2-D relative position bias: index, table resizing.

A table for an H x W feature map holds, per head, one learned scalar per relative offset:
shape (num_heads, 2H-1, 2W-1). The bias between query (i, j) and key (i', j') is
``table[:, i - i' + H - 1, j - j' + W - 1]`` (CoAtNet Eq. 3, added to the logits before softmax).
The flattened index below addresses ``table.flatten(1)``; it is the same index timm uses for its
``(R, num_heads)`` tables, so both agree position for position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def resize_state_dict(state_dict: dict[str, torch.Tensor], img_size: int | tuple[int, int],
                      mode: str = "bilinear", total_stride: int = 32) -> dict[str, torch.Tensor]:
    """A new state dict whose bias tables fit a model built for ``img_size``; identity at equal size.

    The old image size is read off the tables: the last stage's grid is img_size / total_stride
    (32 for every CoAtNet variant), and every table is rescaled by new_size / old_size.
    """
    new_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if any(s <= 0 or s % total_stride for s in new_size):
        raise ValueError(f"img_size {new_size} must be positive and divisible by {total_stride}")
    tables = {k: v for k, v in state_dict.items() if k.endswith("relative_position_bias_table")}
    if not tables:
        return dict(state_dict)
    grids = {k: ((v.shape[-2] + 1) // 2, (v.shape[-1] + 1) // 2) for k, v in tables.items()}
    smallest = min(grids.values())
    old_size = (smallest[0] * total_stride, smallest[1] * total_stride)
    resized = dict(state_dict)
    for key, table in tables.items():
        grid = grids[key]
        new_grid = (grid[0] * new_size[0] // old_size[0], grid[1] * new_size[1] // old_size[1])
        resized[key] = resize_table(table, new_grid, mode)
    return resized
