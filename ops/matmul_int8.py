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

from . import act_quant
from .matmul_fp8 import _HAVE_TRITON
from .triton_launch import Tuned, cdiv

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


def epilogue_ref(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """Pure-torch reference of the epilogue: ``(acc * sx[M,1]) * sw[1,N or 1] + bias`` in float32."""
    y = (acc.to(torch.float32) * sx.reshape(-1, 1).to(torch.float32)) * sw.to(torch.float32).reshape(1, -1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


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
    grid = (cdiv(m, 64), cdiv(n, 128))
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


# The single-kernel form the layers use (``linear_paths.INT8_FUSED_GEMM``): a Triton INT8 GEMM with the
# dequant epilogue fused (no int32 round trip through memory); GPU-only against _int_mm + epilogue in
# bench/RESULTS_LAYERS_H200.md (linear_paths). Correct under the interpreter (tests/test_w8a8_triton.py).
# K is a compile-time constant (one variant per layer width, a handful per model): a constant trip
# count for the K loop (and the Triton interpreter cannot loop over a runtime bound).
if _HAVE_TRITON:

    @triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
                 for bm, bn, bk, s, w in ((128, 128, 128, 3, 8), (128, 256, 64, 3, 8), (64, 128, 128, 4, 4),
                                          (128, 64, 128, 4, 4), (64, 64, 128, 4, 4))],
        key=["M_KEY", "N", "K"],
    )
    @triton.jit
    def _int8_gemm_kernel(a_ptr, b_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr, M, N, K: tl.constexpr, stride_am, stride_bn,
                          stride_ym, sw_stride, M_KEY, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_p = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        b_p = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]  # [K, N] view of w [N, K]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            kk = k0 * BLOCK_K + offs_k
            a = tl.load(a_p, mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0)
            b = tl.load(b_p, mask=(offs_n[None, :] < N) & (kk[:, None] < K), other=0)
            acc += tl.dot(a, b, out_dtype=tl.int32)
            a_p += BLOCK_K
            b_p += BLOCK_K
        mm, mn = offs_m < M, offs_n < N
        sx = tl.load(sx_ptr + offs_m, mask=mm, other=0.0)
        sw = tl.load(sw_ptr + offs_n * sw_stride, mask=mn, other=0.0)
        y = (acc.to(tl.float32) * sx[:, None]) * sw[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mm[:, None] & mn[None, :])


# The tuned config per (device, M_KEY, N, K, output dtype), then direct launches (triton_launch.Tuned).
_GEMM = Tuned(_int8_gemm_kernel) if _HAVE_TRITON else None


def int8_linear_fused(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None, blocks: tuple[int, int, int] | None = None):
    """Same result as ``int8_linear`` from one Triton GEMM with the epilogue fused (any M >= 1).
    ``blocks`` = (BLOCK_M, BLOCK_N, BLOCK_K) bypasses the autotuner (the interpreter tests: the
    autotuner needs a GPU driver)."""
    if not _HAVE_TRITON:
        raise NotImplementedError("int8_linear_fused needs Triton")
    if w.dtype != torch.int8 or w.ndim != 2 or w.stride(1) != 1:
        raise ValueError("int8_linear_fused: the weight must be a row-major int8 [N, K] tensor")
    n, k = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    xq, sx = act_quant.quantize_rows(x2, torch.int8)
    sw = w_scale.to(torch.float32).reshape(-1)
    if sw.numel() not in (1, n):
        raise ValueError(f"int8 weight scale must be a scalar or one per output row ({n}), got {sw.numel()}")
    y = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    b = bias if bias is not None else sw
    # M_KEY: the autotuner's key, M rounded up to a power of two, so that a new token count (another
    # resolution or batch) reuses the tuned config instead of benchmarking all configs again.
    m_key = 1 << max(0, m - 1).bit_length()
    args = (xq, w, sx, sw, b, y, m, n, k, xq.stride(0), w.stride(0), y.stride(0), 1 if sw.numel() > 1 else 0, m_key,
            bias is not None)
    if blocks is not None:
        grid = (cdiv(m, blocks[0]), cdiv(n, blocks[1]))
        _int8_gemm_kernel.fn[grid](*args, *blocks)
        return y.reshape(*lead, n)
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _GEMM.launch((x.device, m_key, n, k, y.dtype), grid, *args)
    return y.reshape(*lead, n)
