"""W8A8 INT8 tensor-core linear (SM 8.0+): per-token int8 activations x int8 weights -> int32.

``int8_linear(x, w, w_scale, bias)`` computes ``x @ (w.float() * w_scale).T + bias`` as

1. ``act_quant.quantize_rows(x, int8)``: codes [M, K] + float32 scale [M, 1] (one launch);
2. ``torch._int_mm(xq, w.t())``: int32 [M, N] on the INT8 tensor cores. ``w`` is the stored int8
   [N, K] row-major weight; ``w.t()`` is the column-major [K, N] view cuBLAS wants (a view, never a
   copy: a ``.contiguous()`` transpose per call costs more than the GEMM).
   torch 2.11's checks (aten ``_int_mm_out_cuda``): 2-D int8 operands, **M > 16**, K > 0 and a
   multiple of 8, N a multiple of 8; int32 result. ``shapes_supported`` / ``MIN_ROWS`` mirror them;
   smaller M runs the 8-bit GEMV (``matmul_small``) instead.
3. ``_epilogue``: ONE Triton kernel ``out = acc * scale_x[m] * scale_w[n] + bias[n]`` -> x.dtype, with
   ``scale_w`` a scalar (``int8_tensorwise``) or per output row (``per_row``: stored [N, 1]).

Precision: the weight is exact, the activation carries the int8 rounding of its row (relative error
<= 0.5/127 of the row's amax per element); the int32 accumulation is exact.
"""

from __future__ import annotations

import torch

from ..converter.formats.base import ceil_div
from . import act_quant, w8a8_gemm
from .matmul_fp8 import _HAVE_TRITON
from .w8a8_gemm import epilogue_ref

MIN_ROWS = 17  # torch._int_mm: "self.size(0) needs to be greater than 16"

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _epilogue_kernel(acc_ptr, sx_ptr, sw_ptr, b_ptr, y_ptr, M, N, sw_stride,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mm, mn = offs_m < M, offs_n < N
        mask = mm[:, None] & mn[None, :]
        idx = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        acc = tl.load(acc_ptr + idx, mask=mask, other=0).to(tl.float32)
        sx = tl.load(sx_ptr + offs_m, mask=mm, other=0.0)
        sw = tl.load(sw_ptr + offs_n * sw_stride, mask=mn, other=0.0)
        y = (acc * sx[:, None]) * sw[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=mask)


def shapes_supported(n_out: int, k_in: int) -> bool:
    """``torch._int_mm`` needs K and N multiples of 8."""
    return k_in > 0 and k_in % 8 == 0 and n_out % 8 == 0


def epilogue(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """The Triton epilogue (CUDA, or the Triton interpreter in tests); int32 ``acc`` [M, N]."""
    if not _HAVE_TRITON:
        raise NotImplementedError("the int8 epilogue needs Triton")
    m, n = acc.shape
    sw = sw.reshape(-1)
    if sw.numel() not in (1, n):
        raise ValueError(f"int8 weight scale must be a scalar or one per output row ({n}), got {sw.numel()}")
    y = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    b = bias if bias is not None else sw
    grid = (ceil_div(m, 64), ceil_div(n, 128))
    _epilogue_kernel[grid](acc.contiguous(), sx.reshape(-1), sw, b, y, m, n, 1 if sw.numel() > 1 else 0,
                           HAS_BIAS=bias is not None, BLOCK_M=64, BLOCK_N=128)
    return y


def int8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None):
    """``x @ dequant(w).T + bias`` on the INT8 tensor cores; ``x`` [..., K] bf16/fp16, ``w`` int8 [N, K]."""
    if w.dtype != torch.int8 or w.ndim != 2 or w.stride(1) != 1:
        raise ValueError("int8_linear: the weight must be a row-major int8 [N, K] tensor")
    n, k = w.shape
    if not shapes_supported(n, k):
        raise ValueError(f"int8_linear: K={k} and N={n} must be multiples of 8 (torch._int_mm)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] < MIN_ROWS:
        raise ValueError(f"int8_linear: torch._int_mm needs more than 16 rows, got {x2.shape[0]}")
    xq, sx = act_quant.quantize_rows(x2, torch.int8)
    acc = torch._int_mm(xq, w.t())
    b = bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias
    if _HAVE_TRITON and x.device.type == "cuda":
        y = epilogue(acc, sx, w_scale.to(torch.float32), b, x.dtype)
    else:
        y = epilogue_ref(acc, sx, w_scale, b, x.dtype)
    return y.reshape(*lead, n)


def int8_linear_fused(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None, blocks: tuple[int, int, int] | None = None):
    """Same result as ``int8_linear`` from one launch after the quantizer (any M >= 1): the fused W8A8
    GEMM (``w8a8_gemm``), what the layers run (``linear_paths.INT8_FUSED_GEMM``). ``blocks`` bypasses
    the autotuner (interpreter tests)."""
    if w.dtype != torch.int8 or w.ndim != 2 or w.stride(1) != 1:
        raise ValueError("int8_linear_fused: the weight must be a row-major int8 [N, K] tensor")
    return w8a8_gemm.linear(x, w, w_scale, bias, act_quant.quantize_rows, torch.int8, out_dtype, blocks)
