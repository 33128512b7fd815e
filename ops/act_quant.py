"""Per-token (per-row) activation quantizer for the W8A8 paths: ONE Triton launch, no host sync.

Spec (``x`` [M, K] bf16/fp16/fp32, any K; the reference ``quantize_rows_ref`` and the Triton kernel
compute exactly the same codes and scales):

- ``amax[m] = max_k |x[m, k]|`` in float32.
- int8: ``scale[m] = amax[m] / 127``; ``q = clamp(rint(x / scale), -127, 127)`` as int8 -- round to
  nearest, ties to even (``torch.round``; the kernel's 1.5 * 2^23 add/subtract), symmetric grid (-128 never written).
- float8_e4m3fn: ``scale[m] = amax[m] / 448``; ``q = clamp(x / scale, -448, 448)`` cast to e4m3fn
  (round to nearest even, as ``Tensor.to`` and the GPU's ``cvt.rn.satfinite``).
- An all-zero row (amax == 0) gets ``scale = 1`` (the codes are 0 either way; never a 0 scale that
  would turn the dequantized GEMM output into NaN). Same rule as the weight grids (``grids.py``).
- The division is IEEE round-to-nearest (``div_rn``), not Triton's default approximate division, so
  the codes match the reference bit for bit.
- Output: codes [M, K] (int8 or float8_e4m3fn) and ``scale`` float32 [M, 1] -- the shape
  ``torch._scaled_mm`` wants for row-wise ``scale_a`` and the epilogue of ``matmul_int8`` reads.

One program per row. Rows of up to ``SINGLE_READ_MAX`` columns (the model widths: Flux 3072, Wan 1536 /
5120) are read once: the codes come from the registers that gave the amax. Longer rows (the MLP down
projections' 12288 / 15360) take the row's amax over K in ``CHUNKS`` unrolled chunks of ``BLOCK``
columns, then a second sweep quantizes (re-reading the row, which is still in L2). The chunk count is a
compile-time constant: one compiled variant per distinct K bucket, a handful per model.
Measured on the H200 (bench/tune_rowquant.py, bench/RESULTS_ROWQUANT_H200.json; e4m3, inputs from
DRAM): M = 4096, K = 3072: 21.9 us (24 us with the second sweep); K = 5120: 43.9 us single-read against
71.6 us with two rows per program -- programs of several rows were slower at every width and M
tried, so there are none; K = 12288: 43.6 us (3.5 TB/s). 8 warps: best or within 5% at M >= 1024.
No atomics, no host-side tensor other than the two outputs, so it is CUDA-graph capturable.
"""

from __future__ import annotations

import torch

from ..converter.formats.base import ceil_div
from .matmul_fp8 import _HAVE_TRITON
from .triton_launch import Kernel, next_pow2

INT8_MAX = 127.0
E4M3_MAX = 448.0
QMAX = {torch.int8: INT8_MAX, torch.float8_e4m3fn: E4M3_MAX}
MAX_BLOCK = 4096  # columns per chunk of the two-sweep form
SINGLE_READ_MAX = 8192  # K up to this (rounded up to a power of two) takes the single-read form

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    from .matmul_fp8 import round_e4m3

    @triton.jit
    def _rowquant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
                         IS_INT8: tl.constexpr, QMAX_C: tl.constexpr, BLOCK: tl.constexpr,
                         CHUNKS: tl.constexpr):
        row = tl.program_id(0)
        x_row = x_ptr + row.to(tl.int64) * stride_x
        q_row = q_ptr + row.to(tl.int64) * stride_q
        if CHUNKS == 1:  # the row is read once: the codes come from the registers that gave the amax
            offs = tl.arange(0, BLOCK)
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            a = tl.max(tl.abs(x), axis=0)
            scale = tl.where(a > 0.0, tl.math.div_rn(a, QMAX_C), 1.0)
            tl.store(s_ptr + row, scale)
            _store_codes(q_row + offs, tl.math.div_rn(x, scale), mask, IS_INT8, QMAX_C)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for c in tl.static_range(CHUNKS):
                offs = c * BLOCK + tl.arange(0, BLOCK)
                x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            a = tl.max(amax, axis=0)
            scale = tl.where(a > 0.0, tl.math.div_rn(a, QMAX_C), 1.0)
            tl.store(s_ptr + row, scale)
            for c in tl.static_range(CHUNKS):
                offs = c * BLOCK + tl.arange(0, BLOCK)
                mask = offs < K
                x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                _store_codes(q_row + offs, tl.math.div_rn(x, scale), mask, IS_INT8, QMAX_C)

    @triton.jit
    def _store_codes(q_ptrs, y, mask, IS_INT8: tl.constexpr, QMAX_C: tl.constexpr):
        y = tl.minimum(tl.maximum(y, -QMAX_C), QMAX_C)
        if IS_INT8:
            # Round half to even by adding and subtracting 1.5 * 2^23 after the clamp (exact for
            # |y| < 2^22; no fast-math in Triton, so the pair is not folded away). Same result as
            # rint, and it also runs under the Triton interpreter (which lacks libdevice).
            y = (y + 12582912.0) - 12582912.0
            tl.store(q_ptrs, y.to(tl.int8), mask=mask)
        else:
            tl.store(q_ptrs, round_e4m3(y).to(tl.float8e4nv), mask=mask)  # (exact cast: see round_e4m3)

    _ROWQUANT = Kernel(_rowquant_kernel)


def _check(x: torch.Tensor, dtype: torch.dtype) -> None:
    if x.ndim != 2:
        raise ValueError(f"quantize_rows: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if dtype not in QMAX:
        raise ValueError(f"quantize_rows: dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")
    if not x.is_floating_point():
        raise ValueError(f"quantize_rows: x must be a float tensor, got {x.dtype}")


def quantize_rows_ref(x: torch.Tensor, dtype: torch.dtype = torch.int8):
    """Pure-torch reference of the spec above: ``(codes [M, K], scale float32 [M, 1])``."""
    _check(x, dtype)
    qmax = QMAX[dtype]
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=1, keepdim=True)
    # by a tensor: CUDA division by a Python scalar multiplies by its reciprocal (one ulp off the
    # kernel's IEEE div_rn for some amax; matmul_fp8._quantize_eager)
    scale = torch.where(amax > 0, amax / torch.full((), qmax, dtype=amax.dtype, device=amax.device),
                        torch.ones_like(amax))
    y = xf / scale
    if dtype == torch.int8:
        return y.round().clamp(-qmax, qmax).to(torch.int8), scale
    return y.clamp(-qmax, qmax).to(torch.float8_e4m3fn), scale


def quantize_rows_triton(x: torch.Tensor, dtype: torch.dtype = torch.int8):
    """The one-launch Triton kernel (CUDA, or the Triton interpreter in tests)."""
    _check(x, dtype)
    if not _HAVE_TRITON:
        raise NotImplementedError("quantize_rows_triton needs Triton")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    block, chunks, warps = _launch_shape(k)
    _ROWQUANT[(m,)](x, q, s, k, x.stride(0), q.stride(0), dtype == torch.int8, QMAX[dtype], block, chunks,
                    num_warps=warps)
    return q, s


WARPS = None  # None: the rule in _launch_shape (bench/tune_rowquant.py overrides it to sweep)
_shapes: dict = {}


def _launch_shape(k: int) -> tuple[int, int, int]:
    """(BLOCK, CHUNKS, num_warps) for rows of ``k`` columns, cached per width (host time)."""
    hit = _shapes.get(k)
    if hit is None:
        block = next_pow2(max(k, 16))
        if block > SINGLE_READ_MAX:
            block = MAX_BLOCK
        hit = _shapes[k] = (block, ceil_div(k, block), WARPS or (8 if block >= 2048 else 4))
    return hit


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.int8):
    """Per-row codes and float32 [M, 1] scales: Triton on CUDA, the reference elsewhere and under
    torch.compile (Inductor fuses the reference's math with the ops around it; same codes)."""
    if _HAVE_TRITON and x.device.type == "cuda" and not torch.compiler.is_compiling():
        return quantize_rows_triton(x, dtype)
    return quantize_rows_ref(x, dtype)
