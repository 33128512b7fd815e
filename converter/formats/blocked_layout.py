"""The cuBLAS "blocked" (swizzled) layout of block-scale matrices, shared by MXFP8 and NVFP4.

Not a format of its own: ``mxfp8.py`` and ``nvfp4.py`` store their per-block scales this way because
it is the layout Blackwell's block-scaled GEMMs read directly (cuBLAS "1D block scaling factors
layout", torch ``SwizzleType.SWIZZLE_32_4_4``), and the layout ComfyUI / comfy-kitchen write.

Spec
----
Input: a scale matrix ``S`` of shape ``[rows, cols]`` (one entry per block; ``rows`` = padded weight
rows, ``cols`` = blocks per padded weight row).

1. Zero-pad ``S`` to ``[R, C]`` with ``R = roundup(rows, 128)``, ``C = roundup(cols, 4)``.
2. View it as ``(R/128, 128, C/4, 4)`` and permute to ``(R/128, C/4, 128, 4)``: one 128×4 tile per
   (row-tile, col-tile), tiles ordered row-tile major.
3. Inside each tile, view the 128 rows as ``(4, 32)`` (row ``r = 32*i + j``) and transpose to
   ``(32, 4)``: the stored tile is ``[j][i][k]`` = ``S[tile_row*128 + 32*i + j, tile_col*4 + k]``,
   i.e. 32 lines of 16 bytes where line ``j`` holds rows ``j, j+32, j+64, j+96`` × 4 columns.
4. The result is stored as a contiguous ``[R, C]`` tensor (a reshape of the tile sequence; its
   "rows" are not the rows of ``S``).

``from_blocked`` inverts this and crops to ``[rows, cols]``. Both are pure index permutations, so they
work for any dtype (uint8 E8M0 codes, float8_e4m3fn scales) on any device.
"""

from __future__ import annotations

import torch

from .base import FormatError, round_up

ROW_TILE = 128
COL_TILE = 4


def blocked_shape(rows: int, cols: int) -> tuple[int, int]:
    """Storage shape ``[roundup(rows,128), roundup(cols,4)]`` of a ``[rows, cols]`` scale matrix."""
    return round_up(rows, ROW_TILE), round_up(cols, COL_TILE)


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` scale matrix -> contiguous ``[R, C]`` blocked layout (see module docstring)."""
    if scales.dim() != 2:
        raise ValueError(f"to_blocked expects a 2-D scale matrix, got shape {tuple(scales.shape)}")
    rows, cols = scales.shape
    r, c = blocked_shape(rows, cols)
    if (r, c) != (rows, cols):
        padded = torch.zeros((r, c), dtype=scales.dtype, device=scales.device)
        padded[:rows, :cols] = scales
    else:
        padded = scales.contiguous()
    tiles = padded.view(r // ROW_TILE, ROW_TILE, c // COL_TILE, COL_TILE).permute(0, 2, 1, 3)
    swizzled = tiles.reshape(-1, 4, 32, COL_TILE).transpose(1, 2)
    return swizzled.reshape(r, c).contiguous()


def from_blocked(blocked: torch.Tensor, rows: int, cols: int, name: str = "weight_scale") -> torch.Tensor:
    """Inverse of ``to_blocked``: ``[R, C]`` blocked storage -> the ``[rows, cols]`` scale matrix."""
    r, c = blocked_shape(rows, cols)
    if blocked.numel() != r * c:
        raise FormatError(
            f"{name}: blocked scale storage has {blocked.numel()} elements, expected {r}x{c}={r * c} "
            f"for a {rows}x{cols} scale matrix"
        )
    tiles = blocked.reshape(-1, 32, 4, COL_TILE).transpose(1, 2)  # (tiles, 4, 32, 4): row = 32*i + j
    tiles = tiles.reshape(r // ROW_TILE, c // COL_TILE, ROW_TILE, COL_TILE).permute(0, 2, 1, 3)
    return tiles.reshape(r, c)[:rows, :cols]
