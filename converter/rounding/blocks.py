"""Block geometry of a format's scale grid, derived from the codec contract alone.

The rounding methods need to sum a per-element error into one number per scale block (to pick a
clipping factor per block) and to broadcast per-block choices back. Codecs only promise
``block_amax(w)`` in the *scale-grid shape*; they do not say which elements form a block. Every
layout in this pack uses one of two block families:

- *tiles*: ``bm × bn`` rectangles in row-major order (tensorwise = one tile of ``M × N``, FP8 rowwise
  / INT8 per-row = ``1 × N``, 2-D blocks = ``bs × bs``, MXFP8 = ``1 × 32``, NVFP4 = ``1 × 16``); the
  last tile row/column may be partial;
- *flat chunks*: ``bs`` consecutive elements of the row-major flattened weight (bitsandbytes 4-bit),
  which may cross row boundaries.

``BlockMap.probe`` finds which one a codec uses by asking ``block_amax`` about index tensors: the
first block's largest row index and column index give ``bm`` and ``bn``; if the grid shape does not
match tiles of that size, the first block's largest flat index gives the chunk size. This keeps the
rounding code format-agnostic (a new codec needs no entry here) and the probe is checked against the
codec's own ``block_amax`` of the real weight in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..formats.base import Codec, ceil_div


@dataclass(frozen=True)
class BlockMap:
    shape: tuple[int, int]
    grid: tuple[int, ...]
    bm: int = 0  # tile rows (tiles)
    bn: int = 0  # tile columns (tiles)
    chunk: int = 0  # flat chunk size (flat)

    @property
    def nblocks(self) -> int:
        return math.prod(self.grid)

    @staticmethod
    def probe(codec: Codec, shape: tuple[int, int], device=None, **opts) -> BlockMap:
        m, n = int(shape[0]), int(shape[1])
        rows = torch.arange(1, m + 1, dtype=torch.float32, device=device).unsqueeze(1).expand(m, n)
        cols = torch.arange(1, n + 1, dtype=torch.float32, device=device).unsqueeze(0).expand(m, n)
        amax_r = codec.block_amax(rows.contiguous(), **opts)
        grid = tuple(amax_r.shape)
        first_r = int(amax_r.reshape(-1)[0])
        first_c = int(codec.block_amax(cols.contiguous(), **opts).reshape(-1)[0])
        bm, bn = first_r, first_c
        gm, gn = ceil_div(m, bm), ceil_div(n, bn)
        if (len(grid) == 0 and (gm, gn) == (1, 1)) or (len(grid) == 1 and gn == 1 and grid == (gm,)) \
                or (len(grid) == 2 and grid == (gm, gn)):
            return BlockMap((m, n), grid, bm=bm, bn=bn)
        # Flat chunks: values of the first chunk are 1..chunk, exact in float32 for any chunk size
        # a format uses (later chunks may round, but only the first one is read).
        flat = torch.arange(1, m * n + 1, dtype=torch.float32, device=device).reshape(m, n)
        chunk = int(codec.block_amax(flat, **opts).reshape(-1)[0])
        if len(grid) == 1 and grid[0] == ceil_div(m * n, chunk):
            return BlockMap((m, n), grid, chunk=chunk)
        raise ValueError(f"{codec.name}: cannot infer the block geometry of scale grid {grid} for weight {(m, n)}")

    def reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a ``[M, N]`` tensor over each block -> the scale-grid shape."""
        m, n = self.shape
        if self.chunk:
            nb = self.grid[0]
            flat = x.reshape(-1)
            pad = nb * self.chunk - flat.numel()
            if pad:
                flat = torch.nn.functional.pad(flat, (0, pad))
            return flat.reshape(nb, self.chunk).sum(dim=1)
        gm, gn = ceil_div(m, self.bm), ceil_div(n, self.bn)
        pm, pn = gm * self.bm - m, gn * self.bn - n
        if pm or pn:
            x = torch.nn.functional.pad(x, (0, pn, 0, pm))
        return x.reshape(gm, self.bm, gn, self.bn).sum(dim=(1, 3)).reshape(self.grid)

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        """Broadcast a scale-grid-shaped tensor to ``[M, N]``."""
        m, n = self.shape
        if self.chunk:
            return g.reshape(-1).repeat_interleave(self.chunk)[: m * n].reshape(m, n)
        gm, gn = ceil_div(m, self.bm), ceil_div(n, self.bn)
        g2 = g.reshape(gm, gn)
        return g2.repeat_interleave(self.bm, dim=0)[:m].repeat_interleave(self.bn, dim=1)[:, :n]
