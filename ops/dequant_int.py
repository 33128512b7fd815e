"""5-bit and 6-bit group-wise integer weights (int5/int6_groupwise) on CUDA: one Triton launch to bf16/fp16.

The codec's torch dequantize (``converter/formats/_intpack.py``) takes several launches per call (nibble
split, high-bit spread, offset, scale multiply) with a temporary per pass; here one kernel reads the
packed row (``Np/2`` bytes of low nibbles, then the high-bit plane) and the float16 group scales and
writes the logical ``[M, N]`` weight in the activation dtype. ``dequant_linear`` = that + ``F.linear``;
the transient is one weight in the activation dtype (2 bytes per weight), freed when the call returns.

Bit for bit the codec's ``dequantize(..., float32)`` cast to ``dtype``: ``q = u - 2**(b-1)`` is a small
integer, ``q * scale`` (float16 scale read as float32) is exact in float32 (at most 16 significant
bits), and the one rounding is the store (bf16 by ``dequant4._bf16_rne``, integer ops, also exact
under the Triton interpreter; fp16 by Triton's round-to-nearest-even cast). Nothing is copied to or
read back from the host: capturable in a CUDA graph once the kernel is compiled.

Tile: ``BLOCK_R`` rows x ``BLOCK_C`` columns (``BLOCK_C`` a multiple of 8, so a tile covers whole
high-plane bytes): the ``BLOCK_C/2`` low-nibble bytes are one contiguous load split into even/odd
columns and interleaved (as ``dequant4`` does for NF4); the high bits and the scale are gathered per
column from the few bytes the tile covers (cached loads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..converter.formats import get_codec
from . import dequant4
from .matmul_fp8 import _HAVE_TRITON

FORMATS = ("int5_groupwise", "int6_groupwise")
_BLOCK_R, _BLOCK_C = 16, 128

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    from .dequant4 import _store_out

    @triton.jit
    def _int_dequant_kernel(w_ptr, s_ptr, y_ptr, M, N, stride_w, stride_s, lo_bytes,
                            BITS: tl.constexpr, GROUP: tl.constexpr, OUT_BF16: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        HB = BITS - 4  # (constexpr) high bits per code: 1 (5-bit) or 2 (6-bit)
        PER = 8 // HB  # (constexpr) codes per high-plane byte
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows[:, None] < M
        row_w = w_ptr + rows.to(tl.int64)[:, None] * stride_w
        byts = tl.program_id(1) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
        p = tl.load(row_w + byts[None, :], mask=rmask & (byts[None, :] < lo_bytes), other=0).to(tl.int32)
        low = tl.interleave(p & 15, p >> 4)  # column 2k: low nibble of byte k, 2k+1: its high nibble
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = rmask & (cols[None, :] < lo_bytes * 2)
        h = tl.load(row_w + lo_bytes + cols[None, :] // PER, mask=cmask, other=0).to(tl.int32)
        high = (h >> ((cols[None, :] % PER) * HB)) & ((1 << HB) - 1)
        q = (low | (high << 4)) - (1 << (BITS - 1))
        s = tl.load(s_ptr + rows.to(tl.int64)[:, None] * stride_s + cols[None, :] // GROUP, mask=cmask, other=0.0)
        v = q.to(tl.float32) * s.to(tl.float32)
        omask = rmask & (cols[None, :] < N)
        _store_out(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], v, omask, OUT_BF16)


def _require(cond: bool, what: str) -> None:
    dequant4._require(cond, what, "dequant_int")


def dequantize_int(fmt: str, tensors, shape, opts, dtype=torch.bfloat16) -> torch.Tensor:
    """The logical ``[M, N]`` weight of a stored ``fmt`` (int5/int6_groupwise) layer in ``dtype``, one launch."""
    _require(fmt in FORMATS, f"{fmt} is not a layout of this module ({', '.join(FORMATS)})")
    _require(dtype in (torch.bfloat16, torch.float16), f"output must be bf16/fp16, got {dtype}")
    codec = get_codec(fmt)
    bits, g = codec.bits, codec.group_size(opts)
    m, n = shape
    groups = -(-n // g)
    w, s = tensors["weight"], tensors["weight_scale"]
    row_bytes = groups * g * bits // 8
    _require(w.dtype == torch.uint8 and tuple(w.shape) == (m, row_bytes) and w.stride(1) == 1,
             f"{fmt} weight must be uint8 [{m}, {row_bytes}] with contiguous rows, got {w.dtype} {tuple(w.shape)}")
    _require(s.dtype == torch.float16 and tuple(s.shape) == (m, groups) and s.stride(1) == 1,
             f"{fmt} weight_scale must be float16 [{m}, {groups}] with contiguous rows, got {s.dtype} {tuple(s.shape)}")
    dequant4._check_device(w, "dequant_int")
    y = torch.empty((m, n), dtype=dtype, device=w.device)
    bf16 = dtype == torch.bfloat16
    grid = (triton.cdiv(m, _BLOCK_R), triton.cdiv(n, _BLOCK_C))
    _int_dequant_kernel[grid](w, s, y.view(torch.int16) if bf16 else y, m, n, w.stride(0), s.stride(0),
                              groups * g // 2, BITS=bits, GROUP=g, OUT_BF16=bf16, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C)
    return y


def dequantize(layer, tensors, dtype) -> torch.Tensor:
    """The layer's core weight (``dequant(weight)``, no transforms) in ``dtype``."""
    return dequantize_int(layer.hq_format, tensors, (layer.out_features, layer.in_features), layer.hq_opts, dtype)


def dequant_linear(layer, x: torch.Tensor, tensors, bias) -> torch.Tensor:
    """``F.linear`` on the weight decoded in ``x.dtype`` (transient: one such weight, freed on return)."""
    _require(x.dtype in (torch.bfloat16, torch.float16), f"activation must be bf16/fp16, got {x.dtype}")
    return F.linear(x, dequantize(layer, tensors, x.dtype), bias)
