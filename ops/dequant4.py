"""4-bit weights on CUDA (NVFP4, bitsandbytes NF4 / FP4) without a float32 weight: Triton kernels.

Before this, an NVFP4 layer on Hopper ran the codec's dequantize per call: int64 codes, a float32
value tensor, a float32 per-element scale and a float32 weight (0.93 GB transient on Flux) and then a
cast. Here every 4-bit layout is decoded by one Triton launch straight into the activation dtype:

- ``dequantize(layer, tensors, dtype)``: ``[N, K]`` bf16/fp16 weight, bit for bit the codec's
  ``dequantize(...)`` (float32) cast to ``dtype``: the same float32 products in the same order, then
  one round-to-nearest-even cast. ``dequant_linear`` = that + ``F.linear``; the transient is one
  weight in the activation dtype (2 bytes per weight), freed when the call returns.
- ``gemv(layer, x, tensors, bias)``: M <= ``GEMV_MAX_ROWS`` rows: reads the packed codes and the
  scales (about a quarter of a bf16 weight's bytes), decodes them in registers to the same values the
  dequantize kernel writes, accumulates in float32 on the tensor cores and writes the output with the
  bias. Weight-bandwidth bound, so 4x fewer bytes is the win over bf16 ``F.linear``.

Decoding (no tables copied per call, nothing read back to the host: capturable in a CUDA graph once
the first call has compiled the kernels and, for bitsandbytes, cached the 16-entry code book):

- NVFP4 (``converter/formats/nvfp4.py``): E2M1 code -> float32 built from its bits (exponent and
  mantissa bits shifted into an IEEE float32, sign from bit 3, code 8 is -0); the e4m3 block scale is
  read as a byte from the cuBLAS blocked layout (``blocked_layout.py``: offset of scale ``(r, j)`` =
  tile ``(r // 128, j // 4)`` * 512 + ``(r % 32) * 16 + ((r % 128) // 32) * 4 + j % 4``) and decoded
  arithmetically (exact, no FP8 instructions: any GPU Triton runs on); ``w = value * (s2 * b)``.
- bitsandbytes (``converter/formats/bnb4bit.py``): flat codes, even element in the high nibble;
  ``w = table[code] * absmax[e // blocksize]``, nested: ``absmax = nested_map[code8] *
  nested_absmax[block // 256] + offset`` -- two roundings, so the kernels are compiled with
  ``enable_fp_fusion=False`` (an FMA would round once and differ from the codec in the last bit).
  The table is the quant type's built-in code book, as the codec and bitsandbytes decode.

Precedence against bitsandbytes' ``matmul_4bit`` for bnb layers is ``BNB_FIRST`` (see
``linear_paths.per_call``); bench/bench_dequant4.py measures both in one run.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..converter.formats.base import ceil_div, round_up
from ..converter.formats.blocked_layout import blocked_shape
from ..converter.formats.bnb4bit import TABLES
from ..converter.formats.registry import find_spec
from .matmul_fp8 import _HAVE_TRITON
from .triton_launch import Kernel

# The fused GEMV runs up to this many rows; above, dequantize + F.linear. OFF (0): measured on the H200
# (bench/bench_dequant4.py, bench/RESULTS_dequant4_H200.md) the GEMV is slower than bf16 at every M
# (NF4 0.05-0.07x, NVFP4 0.1-0.3x: per-element code decode and scale gather) and slower than one-launch
# dequantize + F.linear; enable again once it beats both.
GEMV_MAX_ROWS = 0
# bnb layers: try bitsandbytes' matmul_4bit before our kernels. Measured on the H200: its 4-bit GEMV
# at M=1 is 1.25x bf16 (ours 0.07x) and at M=4096 it ties our dequantize + GEMM (0.94x vs 0.93x), so
# bitsandbytes goes first; NVFP4 (no bitsandbytes path) uses our one-launch dequantize (0.92x at
# M=4096 vs 0.44x for the old float32 codec path).
BNB_FIRST = True
# Under the Triton interpreter (CPU tests) there is no GPU to autotune on: the first config is used.
_AUTOTUNE = os.environ.get("TRITON_INTERPRET", "0") != "1"
_MAX_ELEMS = 2**31 - 1  # int32 index arithmetic in the kernels

_FMT_NVFP4, _FMT_BNB = 0, 1
_GEMV_CONFIGS = ((32, 256, 4), (16, 256, 4), (16, 512, 4), (32, 128, 4), (64, 128, 4), (64, 256, 8))

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _e2m1(code):
        """E2M1 code (int32 0..15) -> float32, exactly. Magnitude index m = 2e + mantissa: for m >= 2 the
        float32 bits are (m + 252) << 22 (exponent e + 126, mantissa bit 22); m = 1 is 0.5 = 252 << 22."""
        m = code & 7
        mag = tl.where(m >= 2, (m + 252) << 22, m * (252 << 22))
        return (mag | ((code & 8) << 28)).to(tl.float32, bitcast=True)  # sign bit 3 -> 31 (code 8: -0)

    @triton.jit
    def _bf16_rne(v):
        """float32 -> bfloat16 bits (int16) rounded to nearest even, by integer ops: exact for every
        finite value, and identical under the Triton interpreter (whose own cast truncates)."""
        bits = v.to(tl.int32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.int16)

    @triton.jit
    def _store_out(ptrs, v, mask, OUT_BF16: tl.constexpr):
        if OUT_BF16:
            tl.store(ptrs, _bf16_rne(v), mask=mask)
        else:
            tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _blocked_offset(r, j, col_tiles):
        """Offset of scale (row r, block column j) in the cuBLAS blocked layout (blocked_layout.py),
        written as a row term plus a column term so each is computed on its own (small) vector."""
        row = (r // 128) * (col_tiles * 512) + (r % 32) * 16 + ((r % 128) // 32) * 4
        return row + ((j // 4) * 512 + (j % 4))

    @triton.jit
    def _bnb_absmax(a_ptr, na_ptr, nm_ptr, offset, blk, mask, NBS: tl.constexpr, NESTED: tl.constexpr):
        if NESTED:
            code = tl.load(a_ptr + blk, mask=mask, other=0).to(tl.int32)
            scale = tl.load(na_ptr + blk // NBS, mask=mask, other=0.0)
            return tl.load(nm_ptr + code) * scale + offset  # two roundings (no FMA: see module doc)
        else:
            return tl.load(a_ptr + blk, mask=mask, other=0.0)

    @triton.jit
    def _nvfp4_dequant_kernel(w_ptr, s_ptr, s2_ptr, y_ptr, M, N, stride_w, col_tiles,
                              OUT_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        byts = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        mask = (rows[:, None] < M) & (byts[None, :] < (N + 1) // 2)
        p = tl.load(w_ptr + rows[:, None] * stride_w + byts[None, :], mask=mask, other=0).to(tl.int32)
        b = tl.load(s_ptr + _blocked_offset(rows[:, None], byts[None, :] // 8, col_tiles), mask=mask)
        s = tl.load(s2_ptr) * b.to(tl.float32)  # S = s2 * b, one float32 product (the codec's)
        v = tl.interleave(_e2m1(p >> 4) * s, _e2m1(p & 15) * s)  # column 2k from the high nibble
        cols = tl.program_id(1) * (2 * BLOCK_B) + tl.arange(0, 2 * BLOCK_B)
        _store_out(y_ptr + rows[:, None] * N + cols[None, :], v, (rows[:, None] < M) & (cols[None, :] < N), OUT_BF16)

    @triton.jit
    def _bnb_dequant_kernel(w_ptr, a_ptr, t_ptr, na_ptr, nm_ptr, offset, y_ptr, n,
                            BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr, OUT_BF16: tl.constexpr,
                            BLOCK: tl.constexpr):
        byts = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = byts < (n + 1) // 2
        p = tl.load(w_ptr + byts, mask=mask, other=0).to(tl.int32)
        s = _bnb_absmax(a_ptr, na_ptr, nm_ptr, offset, (2 * byts) // BS, mask, NBS, NESTED)
        v = tl.interleave(tl.load(t_ptr + (p >> 4)) * s, tl.load(t_ptr + (p & 15)) * s)
        offs = tl.program_id(0) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        _store_out(y_ptr + offs, v, offs < n, OUT_BF16)

    @triton.jit
    def _gemv4_kernel(x_ptr, w_ptr, a_ptr, s2_ptr, t_ptr, na_ptr, nm_ptr, offset, b_ptr, y_ptr,
                      M, N, stride_xm, stride_w, stride_ym, col_tiles, K: tl.constexpr,
                      FMT: tl.constexpr, BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr,
                      HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Even and odd input columns meet the high and low nibbles in two dots: no interleave needed.
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FMT == 0:
            s2 = tl.load(s2_ptr)
        for k0 in range(0, K, BLOCK_K):  # K is a constexpr: the Triton interpreter cannot loop to a runtime bound
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte within the row
            kk = 2 * offs_p
            xrow = x_ptr + offs_m[:, None] * stride_xm + kk[None, :]
            xm = offs_m[:, None] < M
            x_e = tl.load(xrow, mask=xm & (kk[None, :] < K), other=0.0)
            x_o = tl.load(xrow + 1, mask=xm & (kk[None, :] + 1 < K), other=0.0)
            wm = (offs_n[:, None] < N) & (kk[None, :] < K)
            if FMT == 0:
                p = tl.load(w_ptr + offs_n[:, None] * stride_w + offs_p[None, :], mask=wm, other=0).to(tl.int32)
                b = tl.load(a_ptr + _blocked_offset(offs_n[:, None], offs_p[None, :] // 8, col_tiles), mask=wm)
                s = tl.where(wm, s2 * b.to(tl.float32), 0.0)  # masked fp8 lanes are undefined
                w_hi = _e2m1(p >> 4) * s
                w_lo = _e2m1(p & 15) * s
            else:
                e = offs_n[:, None] * K + kk[None, :]  # flat element index (K even)
                p = tl.load(w_ptr + e // 2, mask=wm, other=0).to(tl.int32)
                s = _bnb_absmax(a_ptr, na_ptr, nm_ptr, offset, e // BS, wm, NBS, NESTED)
                w_hi = tl.load(t_ptr + (p >> 4)) * s
                w_lo = tl.load(t_ptr + (p & 15)) * s
            if DOT_F32:  # the interpreter's dot reads bf16 (stored as uint16) as integers
                acc += tl.dot(x_e.to(tl.float32), tl.trans(w_hi.to(x_e.dtype).to(tl.float32)))
                acc += tl.dot(x_o.to(tl.float32), tl.trans(w_lo.to(x_o.dtype).to(tl.float32)))
            else:
                acc += tl.dot(x_e, tl.trans(w_hi.to(x_e.dtype)))
                acc += tl.dot(x_o, tl.trans(w_lo.to(x_o.dtype)))
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    _gemv4_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w) for bn, bk, w in _GEMV_CONFIGS],
        key=["N", "K", "FMT", "NESTED"],
    )(_gemv4_kernel)
    _NVFP4_DEQUANT, _BNB_DEQUANT = Kernel(_nvfp4_dequant_kernel), Kernel(_bnb_dequant_kernel)


_tables: dict = {}


def _table(quant_type: str, device) -> torch.Tensor:
    """The quant type's built-in code book on ``device``, created once (no copy per call)."""
    key = (quant_type, str(device))
    t = _tables.get(key)
    if t is None:
        t = _tables[key] = TABLES[quant_type].to(device)
    return t


def _require(cond: bool, what: str, who: str = "dequant4") -> None:
    if not cond:
        raise ValueError(f"{who}: {what}")


def _check_device(t: torch.Tensor, who: str = "dequant4") -> None:
    """The kernels run on CUDA, or anywhere under the Triton interpreter (CPU tests); shared with dequant_int."""
    if not _HAVE_TRITON:
        raise NotImplementedError(f"{who} needs Triton")
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise NotImplementedError(f"{who} runs on CUDA (or under the Triton interpreter)")


def _nvfp4_args(tensors, shape):
    w, s, s2 = tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"]
    m, n = shape
    mp, np_ = round_up(m, 16), round_up(n, 16)
    r, c = blocked_shape(mp, np_ // 16)
    _require(w.dtype == torch.uint8 and tuple(w.shape) == (mp, np_ // 2) and w.stride(1) == 1,
             f"nvfp4 weight must be contiguous uint8 [{mp}, {np_ // 2}], got {w.dtype} {tuple(w.shape)}")
    _require(s.dtype == torch.float8_e4m3fn and s.numel() == r * c and s.is_contiguous(),
             f"nvfp4 weight_scale must be {r * c} e4m3 scales in the blocked layout, got {s.dtype} {tuple(s.shape)}")
    _require(s2.dtype == torch.float32 and s2.numel() == 1, "nvfp4 weight_scale_2 must be one float32")
    return w, s, s2, c // 4


def _bnb_args(tensors, meta, shape):
    n = shape[0] * shape[1]
    bs = int(meta["blocksize"])
    w, a = tensors["weight"], tensors["weight.absmax"]
    nested = "weight.nested_absmax" in tensors
    _require(w.dtype == torch.uint8 and w.numel() == ceil_div(n, 2) and w.is_contiguous(),
             f"bnb weight must be {ceil_div(n, 2)} contiguous uint8, got {w.dtype} {tuple(w.shape)}")
    _require(a.numel() == ceil_div(n, bs) and a.dtype == (torch.uint8 if nested else torch.float32),
             f"bnb absmax must be {ceil_div(n, bs)} {'uint8 codes' if nested else 'float32'}, got {a.dtype} {tuple(a.shape)}")
    _require(bs % 2 == 0 and bs & (bs - 1) == 0, f"bnb blocksize {bs} must be an even power of two")
    if nested:
        na, nm = tensors["weight.nested_absmax"], tensors["weight.nested_quant_map"]
        nbs = int(meta["nested_blocksize"])
        _require(na.dtype == torch.float32 and na.numel() == ceil_div(a.numel(), nbs), "bnb nested_absmax size")
        _require(nm.dtype == torch.float32 and nm.numel() == 256, "bnb nested_quant_map must be float32 [256]")
        offset = float(meta["nested_offset"])
    else:
        na, nm, nbs, offset = a, a, 1, 0.0
    return w, a, _table(meta["quant_type"], w.device), na, nm, offset, bs, nbs, nested


def dequantize_nvfp4(tensors, shape, dtype=torch.bfloat16) -> torch.Tensor:
    """The logical ``[M, N]`` weight of a stored NVFP4 layer in ``dtype``, one launch."""
    w, s, s2, col_tiles = _nvfp4_args(tensors, shape)
    _check_device(w)
    m, n = shape
    y = torch.empty((m, n), dtype=dtype, device=w.device)
    br, bb = 16, 64
    grid = (ceil_div(m, br), ceil_div(ceil_div(n, 2), bb))
    bf16 = dtype == torch.bfloat16
    _NVFP4_DEQUANT[grid](w, s, s2, y.view(torch.int16) if bf16 else y, m, n, w.stride(0), col_tiles, bf16, br, bb)
    return y


def dequantize_bnb(tensors, meta, shape, dtype=torch.bfloat16) -> torch.Tensor:
    """The logical weight of a bitsandbytes NF4 / FP4 layer (``meta``: its parsed quant state) in ``dtype``."""
    w, a, t, na, nm, offset, bs, nbs, nested = _bnb_args(tensors, meta, shape)
    _check_device(w)
    n = shape[0] * shape[1]
    y = torch.empty(tuple(shape), dtype=dtype, device=w.device)
    block = 1024
    _BNB_DEQUANT[(ceil_div(ceil_div(n, 2), block),)](
        w, a, t, na, nm, offset, y.view(torch.int16) if dtype == torch.bfloat16 else y, n, bs, nbs, nested,
        dtype == torch.bfloat16, block, enable_fp_fusion=False)
    return y


# The registry family of each layout the kernels here read (a format's family is its registry entry's).
_KINDS = {"nvfp4": _FMT_NVFP4, "bnb4bit": _FMT_BNB}


def _kind(fmt: str) -> int:
    """``_FMT_NVFP4`` / ``_FMT_BNB`` for a format of those registry families; a clear error otherwise."""
    spec = find_spec(fmt)
    kind = _KINDS.get(spec.family) if spec is not None else None
    if kind is None:
        raise ValueError(f"dequant4: {fmt} is not a 4-bit layout of this module")
    return kind


def dequantize(layer, tensors, dtype) -> torch.Tensor:
    """The layer's core weight (``dequant(weight)``, no transforms) in ``dtype``."""
    shape = (layer.out_features, layer.in_features)
    if _kind(layer.hq_format) == _FMT_NVFP4:
        return dequantize_nvfp4(tensors, shape, dtype)
    return dequantize_bnb(tensors, layer.hq_bnb, shape, dtype)


def dequant_linear(layer, x: torch.Tensor, tensors, bias) -> torch.Tensor:
    """``F.linear`` on the weight decoded in ``x.dtype`` (transient: one such weight, freed on return)."""
    _require(x.dtype in (torch.bfloat16, torch.float16), f"activation must be bf16/fp16, got {x.dtype}")
    return F.linear(x, dequantize(layer, tensors, x.dtype), bias)


def gemv(layer, x: torch.Tensor, tensors, bias, block_m: int = 16, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` for x ``[..., K]`` with few rows, without materializing the weight.

    Any number of rows works (the grid tiles M by ``block_m``), but the weight is re-read per row
    tile: it is the fast path only up to ``GEMV_MAX_ROWS``. ``config`` = (BLOCK_N, BLOCK_K, warps)
    skips autotuning (tests, and always under the Triton interpreter)."""
    _check_device(x)
    _require(x.dtype in (torch.bfloat16, torch.float16), f"activation must be bf16/fp16, got {x.dtype}")
    n, k = layer.out_features, layer.in_features
    _require(x.shape[-1] == k, f"input has {x.shape[-1]} features, layer takes {k}")
    _require(n * k <= _MAX_ELEMS, "weight too large for int32 indexing")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    kind = _kind(layer.hq_format)
    if kind == _FMT_NVFP4:
        w, a, s2, col_tiles = _nvfp4_args(tensors, (n, k))
        t = na = nm = s2
        offset, bs, nbs, nested, stride_w = 0.0, 16, 1, False, w.stride(0)
    else:
        _require(k % 2 == 0, "bitsandbytes rows start mid-byte for an odd in_features")
        w, a, t, na, nm, offset, bs, nbs, nested = _bnb_args(tensors, layer.hq_bnb, (n, k))
        s2, col_tiles, stride_w = a, 0, 0
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    b = bias if bias is not None else y
    if bias is not None and bias.stride(0) != 1:
        b = bias.contiguous()
    args = (x2, w, a, s2, t, na, nm, offset, b, y, m, n, x2.stride(0), stride_w, y.stride(0), col_tiles)
    consts = dict(K=k, FMT=kind, BS=bs, NBS=nbs, NESTED=nested, HAS_BIAS=bias is not None,
                  DOT_F32=not _AUTOTUNE, BLOCK_M=block_m)
    if config is None and _AUTOTUNE:
        grid = lambda meta: (ceil_div(n, meta["BLOCK_N"]), ceil_div(m, block_m))  # noqa: E731
        _gemv4_tuned[grid](*args, **consts, enable_fp_fusion=False)
    else:
        bn, bk, warps = config or _GEMV_CONFIGS[0]
        _gemv4_kernel[(ceil_div(n, bn), ceil_div(m, block_m))](
            *args, **consts, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, enable_fp_fusion=False)
    return y.reshape(*lead, n)
