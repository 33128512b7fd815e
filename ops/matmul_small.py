"""Small-M and mid-M paths for 8-bit weights whose scale factors out of the GEMM (CUDA only).

For the tensorwise and per-output-row layouts (``float8_e4m3fn``, ``float8_e5m2``,
``float8_e4m3fn_rowwise``, ``int8_tensorwise`` with or without ``per_row``)
``x @ (q * s).T == (x @ q.T) * s`` with ``s`` a scalar or one value per output feature, so the
weight never has to be dequantized into a float copy:

- ``gemv``: M <= 16 rows (text encoders, single-token steps): a Triton kernel reads the 8-bit weight
  once (half the bytes of bf16), converts it in registers, accumulates in float32 and applies ``s``
  and the bias at the end. This is a weight-bandwidth-bound problem: the 8-bit read is the win.
- ``scaled_dequant``: other M: one cast pass ``q -> x.dtype`` (exact for e4m3/e5m2/int8 in bf16/fp16),
  the stock GEMM, then the scale on the output (measured on an H100: cheaper than the codec's
  float32 dequantize, see bench/RESULTS_H100.md).

Neither path quantizes activations, so the precision is that of dequantize + ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..converter.formats.base import ceil_div
from .matmul_fp8 import _HAVE_TRITON
from .triton_launch import Tuned

GEMV_MAX_ROWS = 16

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                 for bn, bk, w in ((16, 256, 4), (16, 512, 4), (32, 256, 4), (32, 128, 4), (64, 128, 4))],
        key=["N", "K"],
    )
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, s_stride,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        s = tl.load(s_ptr + offs_n * s_stride, mask=offs_n < N, other=0.0)
        acc = acc * s[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


    # the autotuner's choice per (device, N, K, dtypes), then direct launches (triton_launch.Tuned)
    _GEMV = Tuned(_gemv_kernel)


def out_scale(fmt: str, scale: torch.Tensor) -> torch.Tensor:
    """The scale as a float32 vector over output features (length 1 for tensorwise)."""
    return scale.to(torch.float32).reshape(-1)


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(x @ w.T) * scale + bias`` for x [..., K] with at most 16 rows, w 8-bit [N, K] row-major."""
    if not _HAVE_TRITON or x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        raise NotImplementedError("gemv needs CUDA, Triton and a bf16/fp16 activation")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    n = w.shape[0]
    if m > GEMV_MAX_ROWS or w.stride(1) != 1:
        raise ValueError("gemv: too many rows or non-contiguous weight")
    s = scale.to(torch.float32).reshape(-1).contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    b = bias.contiguous() if bias is not None else s
    grid = lambda meta: (ceil_div(n, meta["BLOCK_N"]),)  # noqa: E731
    _GEMV.launch((x.device, n, k, x.dtype, w.dtype), grid, x2, w, s, b, y, m, n, k, x2.stride(0), w.stride(0),
                 y.stride(0), 1 if s.numel() > 1 else 0, bias is not None, 16)
    return y.reshape(*lead, n)


def scaled_dequant(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w.to(x.dtype)) * scale + bias`` (scale scalar or per output feature)."""
    y = F.linear(x, w.to(x.dtype))
    y = y * scale.to(device=y.device, dtype=y.dtype).reshape(-1)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
