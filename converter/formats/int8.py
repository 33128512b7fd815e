"""INT8 layouts: tensorwise, per-row and blockwise, symmetric.

Spec (M = out_features, N = in_features; all tensors unpadded at the logical ``[M, N]``):

=====================================  ============  =====================================================
format name (``.comfy_quant``)         ``.weight``   ``.weight_scale`` (float32)
=====================================  ============  =====================================================
``int8_tensorwise``                    int8 [M, N]   ``[]`` = amax / 127
``int8_tensorwise`` + ``per_row``      int8 [M, N]   ``[M, 1]`` = row amax / 127
``int8_blockwise`` + ``group_size``    int8 [M, N]   ``[ceil(M/bs), ceil(N/bs)]`` = tile amax / 127
=====================================  ============  =====================================================

- Symmetric grid −127..127 (−128 is never written, so the grid is symmetric and ``-q`` is exact).
- ``q = clamp(round(w / scale), -127, 127)`` with ``torch.round`` (round to nearest, ties to even) —
  not truncation, which doubles the error. ``dequant = weight.float() * scale``; hence the round-trip
  error is at most ``scale / 2`` per element of an unclipped block.
- All-zero tensors/blocks get scale 1.0 (see ``grids.py``), never 0.
- Options: ``per_row`` (``int8_tensorwise``; default False when writing; ``.comfy_quant`` carries
  ``"per_row": true`` only when set; when reading and it is absent, a ``[M, 1]`` scale is recognised
  as per-row, as ComfyUI does), ``group_size`` (``int8_blockwise``, default 128, always written into
  ``.comfy_quant``), ``name`` (the tensor's name in error messages, default ``"weight"``).
- ``int8_tensorwise`` is a name stock ComfyUI (0.29) reads; ``int8_blockwise`` is this pack's.
"""

from __future__ import annotations

import torch

from .base import FormatError
from .grids import GridCodec, check_group_size
from .spec import FormatSpec, Variant

__all__ = ["Int8Tensorwise", "Int8Blockwise"]


class _Int8(GridCodec):
    storage = torch.int8
    qmax = 127.0

    def encode_(self, x: torch.Tensor) -> torch.Tensor:
        return x.round_().clamp_(-127, 127).to(torch.int8)


class Int8Tensorwise(_Int8):
    """``int8_tensorwise``: one scale (``[]``), or one per output row (``[M, 1]``) with ``per_row``."""

    spec = FormatSpec(
        name="int8_tensorwise", label="INT8", family="int8", color="#9c5fc9",
        summary="8-bit integers: half of bf16's size; per-row scales are the most accurate 8-bit choice; "
                "INT8 tensor cores on RTX 30xx and newer",
        variants=(Variant("tensor", "INT8 (one scale per tensor)"),
                  Variant("row", "INT8 (one scale per row)", {"per_row": True}, note="most accurate 8-bit")),
        scale_out=True, clipping=True, kernels={"int8_tensorcore": "int8"},
        aliases=("int8", "8-bit", "8bit", "w8a8"),
        advice=(("int8_tensorwise", {"per_row": True}), ("int8_blockwise", {"group_size": 128}),
                ("float8_e4m3fn_rowwise", {})),
        budget_steps=({"per_row": True},))

    def layout(self, opts, tensors=None):
        per_row = opts.get("per_row")
        if per_row is None:
            # Reading a file that does not say: the scale's shape does (ComfyUI reads it this way too).
            s = tensors.get("weight_scale") if tensors is not None else None
            per_row = s is not None and s.ndim == 2
        if not isinstance(per_row, bool):
            raise FormatError(f"per_row must be true or false, got {per_row!r}")
        return ("row1" if per_row else "tensor"), 0

    def metadata(self, **opts) -> dict:
        d = {"format": self.name}
        if opts.get("per_row"):
            d["per_row"] = True
        return d


class Int8Blockwise(_Int8):
    """``int8_blockwise``: one scale per ``group_size``² tile, grid ``[ceil(M/bs), ceil(N/bs)]``."""

    spec = FormatSpec(
        name="int8_blockwise", label="INT8 blocks", family="int8", color="#c08ae6",
        summary="8-bit integers, one scale per 128x128 tile; dequantized per call",
        variants=(Variant("block", "INT8 (one scale per 128x128 block)", {"group_size": 128}),),
        clipping=True, aliases=("int8", "blockwise"),
        advice=(("int8_tensorwise", {"per_row": True}), ("mxfp8", {})))
    default_group_size = 128

    def layout(self, opts, tensors=None):
        return "tile", check_group_size(opts.get("group_size", self.default_group_size))

    def metadata(self, **opts) -> dict:
        return {"format": self.name, "group_size": check_group_size(opts.get("group_size", self.default_group_size))}
