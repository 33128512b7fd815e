"""The fused W8A8 GEMM: 8-bit activation codes x 8-bit weight codes on the tensor cores, with the
dequantizing epilogue in the same kernel (one launch after the activation quantizer).

``gemm(xq, sx, w, sw, bias, out_dtype)`` computes ``y[m, n] = (acc[m, n] * sx[m]) * sw[n] + bias[n]``:

- ``xq`` [M, K] int8 or float8_e4m3fn, row-major: the per-token codes of ``act_quant.quantize_rows``
  with ``sx`` float32 [M, 1] their scales, or tensorwise e4m3 codes (``matmul_fp8.quantize_activation``)
  with ``sx`` their one float32 scale (read with stride 0).
- ``w`` [N, K] of the same dtype, row-major (the stored weight; read as the column-major [K, N]
  operand, which is the K-major layout Hopper's 8-bit wgmma needs, so no transpose is ever made).
- ``acc``: exact int32 sums for int8; for e4m3 the tensor cores' FP8 sums, promoted into a float32
  accumulator after every ``BLOCK_K`` columns (64 or 128), as cuBLAS does without fast accumulation
  (``FP8_FAST_ACCUM`` = True keeps them in the FP8 accumulator: faster on SM 9.0, less precise).
- ``sw`` float32: a scalar (tensorwise) or one per output row ([N] / [N, 1]); read with stride 0 or 1,
  so a tensorwise weight needs no [1, N] expansion.
- The epilogue multiplies in float32 in that order, adds the bias in float32 and rounds once to
  ``out_dtype`` (bf16 / fp16 / fp32): ``epilogue_ref`` is the same math in torch, except that on a GPU
  Triton fuses ``* sw + bias`` into one fma (one rounding fewer), so GPU tests compare with a
  tolerance; the interpreter computes exactly ``epilogue_ref``.

Why a Triton GEMM for FP8 too, where ``torch._scaled_mm`` exists: on the H200 the two are equally
fast on the GPU at Flux shapes (bench/RESULTS_LAYERS_H200.md: this kernel for int8 1.43-1.72x bf16 at
M = 4096, row-wise ``_scaled_mm`` 1.44-1.77x; the 8-bit tensor-core rates are the same), and the eager
forward is host-bound: a ``_scaled_mm`` call costs ~29-34 us of host time against ~10-15 us for this
kernel's cached launch (bench/bench_host.py --ops), and it writes fp16 outputs directly (row-wise
``_scaled_mm`` has a bf16 output only).

Tuning: ``triton.autotune`` over a few tile shapes, once per (device, M bucket, N, K, dtypes); then the
kept config is launched directly (``triton_launch.Tuned``). K is a compile-time constant (one variant
per layer width): a constant trip count for the K loop, which the Triton interpreter also needs.
"""

from __future__ import annotations

import torch

from ..converter.formats.base import ceil_div
from .matmul_fp8 import _HAVE_TRITON
from .triton_launch import Tuned, next_pow2

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    def _prune(configs, named_args, **kwargs):
        """Configs for this call: e4m3 with fp32 promotion (not FAST_ACC) drops 128 x 256 x 64, which
        spills on SM 9.0 once the promotion adds a second accumulator (ptxas: 255 registers, ~160 B
        of spill stores, ahead-of-time compile of this kernel for sm_90 with Triton 3.6)."""
        if named_args.get("IS_FP8") and not named_args.get("FAST_ACC"):
            kept = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) != (256, 64)]
            return kept or configs
        return configs

    @triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
                 for bm, bn, bk, s, w in ((128, 128, 128, 3, 8), (128, 256, 64, 3, 8), (64, 128, 128, 4, 4),
                                          (128, 64, 128, 4, 4), (64, 64, 128, 4, 4))],
        key=["M_KEY", "N", "K", "IS_FP8", "FAST_ACC"],
        prune_configs_by={"early_config_prune": _prune},
    )
    @triton.jit
    def _w8a8_kernel(a_ptr, b_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr, M, N, K: tl.constexpr, stride_am, stride_bn,
                     stride_ym, sx_stride, sw_stride, M_KEY, HAS_BIAS: tl.constexpr, IS_FP8: tl.constexpr,
                     FAST_ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_p = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        b_p = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]  # [K, N] view of w [N, K]
        if IS_FP8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            kk = k0 * BLOCK_K + offs_k
            am = (offs_m[:, None] < M) & (kk[None, :] < K)
            bm = (offs_n[None, :] < N) & (kk[:, None] < K)
            if IS_FP8:  # (a float ``other``: Triton casts no int to fp8)
                a = tl.load(a_p, mask=am, other=0.0)
                b = tl.load(b_p, mask=bm, other=0.0)
                if FAST_ACC:  # Triton's SM 9.0 default: the whole K loop in the wgmma FP8 accumulator
                    acc = tl.dot(a, b, acc)
                else:
                    # Promote the tensor cores' FP8 partial sums into the float32 accumulator every
                    # BLOCK_K (as _scaled_mm's default use_fast_accum=False). Costs on SM 9.0: ptxas
                    # waits for each wgmma before the add (no overlap across iterations).
                    acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
            else:
                a = tl.load(a_p, mask=am, other=0)
                b = tl.load(b_p, mask=bm, other=0)
                acc += tl.dot(a, b, out_dtype=tl.int32)
            a_p += BLOCK_K
            b_p += BLOCK_K
        mm, mn = offs_m < M, offs_n < N
        sx = tl.load(sx_ptr + offs_m * sx_stride, mask=mm, other=0.0)
        sw = tl.load(sw_ptr + offs_n * sw_stride, mask=mn, other=0.0)
        y = (acc.to(tl.float32) * sx[:, None]) * sw[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mm[:, None] & mn[None, :])


# The tuned config per (device, M bucket, N, K, codes dtype, accumulation, output dtype), then direct
# launches.
_GEMM = Tuned(_w8a8_kernel) if _HAVE_TRITON else None
# e4m3 accumulation: False = fp32 promotion every BLOCK_K (the precision of _scaled_mm's default);
# True = Triton's SM 9.0 default, the whole K loop in the tensor cores' FP8 accumulator (~14 bits, like
# use_fast_accum=True). Measured on the H200 at 003e804 (bench/RESULTS_TRITON_FP8_H200.md, Flux 1024^2 with
# both FP8 Triton paths on): GPU-only 37.0 ms with it, 41.9 ms without, 36.4 ms for cuBLAS (_scaled_mm,
# fp32 promotion); the whole-model rel. error vs bf16 was 1.69e-3 either way. Off: even with it the
# kernel does not beat cuBLAS on e4m3 codes, and precision is kept. Ada (SM 8.9) accumulates in fp32 either way.
FP8_FAST_ACCUM = False
CODES = (torch.int8, torch.float8_e4m3fn)


def epilogue_ref(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """Pure-torch reference of the epilogue: ``(acc * sx[M,1]) * sw[1,N or 1] + bias`` in float32."""
    y = (acc.to(torch.float32) * sx.reshape(-1, 1).to(torch.float32)) * sw.to(torch.float32).reshape(1, -1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def gemm(xq: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
         out_dtype: torch.dtype, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The kernel (module docstring) on 2-D codes; ``sw`` float32 (scalar or N values). ``blocks`` =
    (BLOCK_M, BLOCK_N, BLOCK_K) bypasses the autotuner (the interpreter tests: it needs a GPU)."""
    if not _HAVE_TRITON:
        raise NotImplementedError("the W8A8 GEMM needs Triton")
    m, k = xq.shape
    n = w.shape[0]
    if (w.dtype != xq.dtype or xq.dtype not in CODES or w.ndim != 2 or w.shape[1] != k or w.stride(1) != 1
            or xq.stride(1) != 1):
        raise ValueError(f"w8a8 gemm: codes [M, K] and weight [N, K] must be row-major {CODES}, same dtype; "
                         f"got {xq.dtype} {tuple(xq.shape)} and {w.dtype} {tuple(w.shape)}")
    ns, nx = sw.numel(), sx.numel()
    if ns not in (1, n) or sw.dtype != torch.float32:
        raise ValueError(f"w8a8 gemm: weight scale must be float32, a scalar or one per output row ({n}); "
                         f"got {sw.dtype} with {ns} values")
    if nx not in (1, m) or sx.dtype != torch.float32:
        raise ValueError(f"w8a8 gemm: activation scale must be float32, a scalar or one per row ({m}); "
                         f"got {sx.dtype} with {nx} values")
    sw = sw.reshape(-1)  # a view of a contiguous scale; a strided one is copied (the kernel reads stride 1)
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    b = bias if bias is not None else sw
    # M_KEY: the autotuner's key, M rounded up to a power of two, so that a new token count (another
    # resolution or batch) reuses the tuned config instead of benchmarking all configs again.
    m_key = next_pow2(m)
    fp8 = xq.dtype is torch.float8_e4m3fn
    fast = fp8 and FP8_FAST_ACCUM
    args = (xq, w, sx, sw, b, y, m, n, k, xq.stride(0), w.stride(0), y.stride(0), 1 if nx > 1 else 0,
            1 if ns > 1 else 0, m_key, bias is not None, fp8, fast)
    if blocks is not None:
        _w8a8_kernel.fn[(ceil_div(m, blocks[0]), ceil_div(n, blocks[1]))](*args, *blocks)
        return y
    grid = lambda meta: (ceil_div(m, meta["BLOCK_M"]), ceil_div(n, meta["BLOCK_N"]))  # noqa: E731
    _GEMM.launch((xq.device, m_key, n, k, fp8, fast, out_dtype), grid, *args)
    return y


def linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, quantize, qarg,
           out_dtype: torch.dtype | None = None, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(w).T + bias`` through ``gemm``: ``quantize(x as [M, K], qarg)`` gives the
    codes and their scales (``act_quant.quantize_rows`` with the codes' dtype, or
    ``matmul_fp8.quantize_activation`` with the file's input scale); output in ``out_dtype`` or x's."""
    n, k = w.shape
    xq, sx = quantize(x.reshape(-1, k), qarg)
    sw = w_scale if w_scale.dtype is torch.float32 else w_scale.to(torch.float32)
    return gemm(xq, sx, w, sw, bias, out_dtype or x.dtype, blocks).reshape(*x.shape[:-1], n)
