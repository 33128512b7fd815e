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

Tile: ``BLOCK_R`` rows x ``BLOCK_C`` columns (``BLOCK_C`` a power of two >= 8, so a tile covers whole
high-plane bytes): the ``BLOCK_C/2`` low-nibble bytes are one contiguous load split into even/odd
columns and interleaved (as ``dequant4`` does for NF4). The high bits and the scales: with ``VEC`` (a
power-of-two group no wider than the tile) one contiguous load of the tile's ``BLOCK_C/PER`` high-plane
bytes and ``BLOCK_C/GROUP`` scales, each widened in registers (shift per code, broadcast per group);
otherwise gathered per column (cached loads). The tile is ``TILE`` (rows, columns, warps), chosen by
``bench/tune_dq_int.py`` on the H200 (numbers beside it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..converter.formats import get_codec
from ..converter.formats.base import ceil_div
from . import dequant4
from .matmul_fp8 import _HAVE_TRITON
from .triton_launch import Kernel

FORMATS = ("int5_groupwise", "int6_groupwise")
# (BLOCK_R, BLOCK_C, num_warps), with VEC loads where the group allows. bench/tune_dq_int.py on the H200
# (commit 01388ad, 12 Flux weight shapes of INT5/INT6 g32, cold L2): (16, 512, 8) is the best summed over
# the shapes, 466 us against 561 us for the first version's (16, 128, 4) with gathered loads (3.3x at
# 3072x3072, 1.0-1.2x at the large shapes, where it reaches 2.6-3.2 TB/s, about a bf16 copy of the
# output). bitsandbytes' NF4 dequantize of the same shapes took 1.3-4x longer than the best tile.
TILE = (16, 512, 8)

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    from .dequant4 import _store_out

    @triton.jit
    def _int_dequant_kernel(w_ptr, s_ptr, y_ptr, M, N, stride_w, stride_s, lo_bytes,
                            BITS: tl.constexpr, GROUP: tl.constexpr, OUT_BF16: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
                            HB: tl.constexpr, PER: tl.constexpr):
        # HB: high bits per code (BITS - 4: 1 for 5-bit, 2 for 6-bit), PER = 8 // HB codes per high-plane
        # byte; passed in (not computed here) so they stay constexpr under the CPU interpreter too
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows[:, None] < M
        row_w = w_ptr + rows.to(tl.int64)[:, None] * stride_w
        row_s = s_ptr + rows.to(tl.int64)[:, None] * stride_s
        byts = tl.program_id(1) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
        p = tl.load(row_w + byts[None, :], mask=rmask & (byts[None, :] < lo_bytes), other=0).to(tl.int32)
        low = tl.interleave(p & 15, p >> 4)  # column 2k: low nibble of byte k, 2k+1: its high nibble
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        if VEC:
            # code c sits in high-plane byte c // PER at bit (c % PER) * HB: a [R, C/PER, PER] shift
            # table read row-major is column order
            hb = tl.program_id(1) * (BLOCK_C // PER) + tl.arange(0, BLOCK_C // PER)
            h = tl.load(row_w + lo_bytes + hb[None, :], mask=rmask & (hb[None, :] < (lo_bytes * 2) // PER),
                        other=0).to(tl.int32)
            shift = tl.arange(0, PER) * HB
            high = tl.reshape((h[:, :, None] >> shift[None, None, :]) & ((1 << HB) - 1), (BLOCK_R, BLOCK_C))
            gi = tl.program_id(1) * (BLOCK_C // GROUP) + tl.arange(0, BLOCK_C // GROUP)
            sg = tl.load(row_s + gi[None, :], mask=rmask & (gi[None, :] < (lo_bytes * 2) // GROUP), other=0.0)
            s = tl.reshape(tl.broadcast_to(sg[:, :, None], (BLOCK_R, BLOCK_C // GROUP, GROUP)), (BLOCK_R, BLOCK_C))
        else:
            cmask = rmask & (cols[None, :] < lo_bytes * 2)
            h = tl.load(row_w + lo_bytes + cols[None, :] // PER, mask=cmask, other=0).to(tl.int32)
            high = (h >> ((cols[None, :] % PER) * HB)) & ((1 << HB) - 1)
            s = tl.load(row_s + cols[None, :] // GROUP, mask=cmask, other=0.0)
        q = (low | (high << 4)) - (1 << (BITS - 1))
        v = q.to(tl.float32) * s.to(tl.float32)
        omask = rmask & (cols[None, :] < N)
        _store_out(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], v, omask, OUT_BF16)


    _DEQUANT = Kernel(_int_dequant_kernel)


def _require(cond: bool, what: str) -> None:
    dequant4._require(cond, what, "dequant_int")


def dequantize_int(fmt: str, tensors, shape, opts, dtype=torch.bfloat16, tile=None, vec=None) -> torch.Tensor:
    """The logical ``[M, N]`` weight of a stored ``fmt`` (int5/int6_groupwise) layer in ``dtype``, one launch.
    ``tile`` / ``vec`` override ``TILE`` / ``vectorized()`` (tests and bench/tune_dq_int.py)."""
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
    block_r, block_c, warps = tile or TILE
    vec = vectorized(g, block_c) if vec is None else vec
    grid = (ceil_div(m, block_r), ceil_div(n, block_c))
    _DEQUANT[grid](w, s, y.view(torch.int16) if bf16 else y, m, n, w.stride(0), s.stride(0), groups * g // 2,
                   bits, g, bf16, block_r, block_c, vec, bits - 4, 8 // (bits - 4), num_warps=warps)
    return y


def vectorized(group: int, block_c: int) -> bool:
    """Whether the tile can load its scales as one [rows, BLOCK_C/GROUP] block: a power-of-two group
    no wider than the tile (Triton tensor dims are powers of two)."""
    return group & (group - 1) == 0 and group <= block_c


def dequantize(layer, tensors, dtype) -> torch.Tensor:
    """The layer's core weight (``dequant(weight)``, no transforms) in ``dtype``."""
    return dequantize_int(layer.hq_format, tensors, (layer.out_features, layer.in_features), layer.hq_opts, dtype)


def dequant_linear(layer, x: torch.Tensor, tensors, bias) -> torch.Tensor:
    """``F.linear`` on the weight decoded in ``x.dtype`` (transient: one such weight, freed on return)."""
    _require(x.dtype in (torch.bfloat16, torch.float16), f"activation must be bf16/fp16, got {x.dtype}")
    return F.linear(x, dequantize(layer, tensors, x.dtype), bias)
