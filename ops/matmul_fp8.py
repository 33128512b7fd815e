"""Tensorwise FP8 matmul for Ada / Hopper (SM 8.9 / 9.x) with a fused activation quantizer.

``fp8_linear(x, w, w_scale, bias, input_scale=None)`` computes ``x @ (w.float() * w_scale).T + bias``
with ``torch._scaled_mm``:

- ``w``: e4m3fn (or e5m2) ``[N, K]`` row-major (the stored weight); ``_scaled_mm`` wants the second
  operand column-major, which ``w.t()`` of a contiguous ``[N, K]`` tensor is. K and N must be
  multiples of 16; float32 one-element scales; a bias only with a bf16/fp16 output (otherwise it is
  added after the GEMM).
- Activations are quantized per call to e4m3fn with one scale per tensor: the calibrated
  ``input_scale`` when the file carries one, else a dynamic ``amax(|x|) / 448``.

Why fused: measured on an H100 (DESIGN.md §4), an eager ``amax`` / divide / clamp / cast costs more
than the FP8 GEMM saves (0.93x of bf16 at M=4096, K=3072, N=12288). The quantizer is ONE Triton
launch (``_quant_onepass_kernel``): a persistent, cooperative grid (at most a few programs per SM,
launched with ``launch_cooperative_grid`` so CUDA guarantees they are co-resident or refuses the
launch -- never a hang) computes a grid-wide amax with an integer atomic max (|x| >= 0 floats order
like their bit patterns), waits at an atomic-counter barrier, then scales/clamps/casts its share. A
per-device, per-stream workspace holds [amax bits, arrivals, departures]; the last program to leave
zeroes it, so there is no host work and no ``torch.zeros`` launch per call, and CUDA graphs capture it.
Why one launch: the eager forward is host-bound and each Triton launch costs ~20 us of CPU time on
the H200 (bench/bench_host.py). The previous two-kernel form (amax kernel, then cast kernel reading the
amax from device memory) is kept as ``impl="triton2"`` and as the fallback when a cooperative launch
is refused. Where Triton is missing, ``torch.compile`` of the same math is used; eager only as the
last resort. All forms compute the same scale and codes (IEEE division, ``div_rn``: Triton's default fp32 ``/`` is
approximate and moved codes by one step against the eager reference); ``bench/bench_matmul.py``
measures them.
"""

from __future__ import annotations

import logging

import torch

from ..converter.formats.base import ceil_div
from .triton_launch import Kernel

log = logging.getLogger("hybridquant.ops")

E4M3_MAX = 448.0
# Smallest amax we divide by: an all-zero activation gets scale 1/448 instead of 0 (no NaN).
_AMAX_FLOOR = 1e-12

try:  # Triton ships with CUDA torch builds; CPU-only installs may lack it.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    _HAVE_TRITON = False


if _HAVE_TRITON:

    @triton.jit
    def _amax_kernel(x_ptr, amax_bits_ptr, n, BLOCK: tl.constexpr):
        a = _absmax_block(x_ptr, n, tl.program_id(0), BLOCK)
        # Non-negative IEEE floats compare like their int32 bit patterns: integer atomic max.
        tl.atomic_max(amax_bits_ptr, a.to(tl.int32, bitcast=True))

    @triton.jit
    def _quant_kernel(x_ptr, y_ptr, amax_bits_ptr, scale_ptr, n, static_scale,
                      USE_STATIC: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        if USE_STATIC:
            scale = static_scale
        else:
            amax = tl.load(amax_bits_ptr).to(tl.float32, bitcast=True)
            scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
        if pid == 0:
            tl.store(scale_ptr, scale)
        _cast_block(x_ptr, y_ptr, n, pid, scale, BLOCK)

    @triton.jit
    def _absmax_block(x_ptr, n, blk, BLOCK: tl.constexpr):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        return tl.max(tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)), axis=0)

    @triton.jit
    def _cast_block(x_ptr, y_ptr, n, blk, scale, BLOCK: tl.constexpr):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
        tl.store(y_ptr + offs, round_e4m3(y).to(tl.float8e4nv), mask=mask)

    @triton.jit
    def round_e4m3(y):
        """``y`` (float32, |y| <= 448, not NaN) rounded to the nearest float8_e4m3fn value, ties to even,
        as float32: the cast to e4m3 that follows is then exact on every GPU.

        Why explicit: on SM 8.9 Triton lowers an f32 -> e4m3 cast as ``cvt.rz.f16.f32`` then
        ``cvt.rn.satfinite.e4m3x2.f16x2``, two roundings, the first toward zero, so a value just above
        a halfway point between two e4m3 values (1.0625 + 2^-20) lands on the halfway point and rounds
        to even the wrong way (1.0 instead of torch's 1.125; ~0.3% of a quantized activation's codes).
        SM 9.0's single ``cvt.rn.satfinite.e4m3x2.f32`` is right; so is this on both.

        - normal range (|y| >= 2^-6): keep 3 of float32's 23 mantissa bits, rounding the 20 dropped
          bits to nearest even in the integer bit pattern (a carry moves into the exponent, as it
          should; the sign bit is never reached for |y| <= 448);
        - subnormals (|y| < 2^-6, steps of 2^-9): |y| + 1.5 * 2^14 rounds |y| to a multiple of float32's
          ulp there, 2^-9 (ties to even), and subtracting it back is exact; the sign is put back (-0
          stays -0). No fast-math in Triton, so the add / subtract pair is not folded away.
        """
        b = y.to(tl.int32, bitcast=True)
        normal = ((b + 0x7FFFF + ((b >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        sub = (((tl.abs(y) + 24576.0) - 24576.0).to(tl.int32, bitcast=True) | (b & -2147483648)).to(
            tl.float32, bitcast=True)
        return tl.where(tl.abs(y) < 0.015625, sub, normal)

    @triton.jit
    def _quant_onepass_kernel(x_ptr, y_ptr, ws_ptr, scale_ptr, n, nprog, static_scale,
                              USE_STATIC: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr = 0):
        # nprog: the grid size; program pid handles blocks pid, pid + nprog, ... ITERS: blocks per
        # program, 0 (compiled) = computed here; the CPU interpreter cannot loop to a runtime bound,
        # so its tests pass ITERS (the two loops below are the same loop).
        pid = tl.program_id(0)
        if USE_STATIC:
            scale = static_scale
        else:
            a = 0.0
            if ITERS > 0:
                for it in range(0, ITERS):
                    a = tl.maximum(a, _absmax_block(x_ptr, n, it * nprog + pid, BLOCK))
            else:
                for it in range(0, tl.cdiv(n, nprog * BLOCK)):
                    a = tl.maximum(a, _absmax_block(x_ptr, n, it * nprog + pid, BLOCK))
            tl.atomic_max(ws_ptr, a.to(tl.int32, bitcast=True))
            # Grid barrier: every program's max is in before anyone reads it (acq_rel atomics).
            arrived = tl.atomic_add(ws_ptr + 1, 1) + 1
            while arrived < nprog:
                arrived = tl.atomic_add(ws_ptr + 1, 0)
            amax = tl.atomic_max(ws_ptr, 0).to(tl.float32, bitcast=True)
            scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
            # The last program to leave has seen every other program read the amax: reset for the
            # next call (stream-ordered after this kernel).
            if tl.atomic_add(ws_ptr + 2, 1) == nprog - 1:
                tl.atomic_xchg(ws_ptr, 0)
                tl.atomic_xchg(ws_ptr + 1, 0)
                tl.atomic_xchg(ws_ptr + 2, 0)
        if pid == 0:
            tl.store(scale_ptr, scale)
        if ITERS > 0:
            for it in range(0, ITERS):
                _cast_block(x_ptr, y_ptr, n, it * nprog + pid, scale, BLOCK)
        else:
            for it in range(0, tl.cdiv(n, nprog * BLOCK)):
                _cast_block(x_ptr, y_ptr, n, it * nprog + pid, scale, BLOCK)

    _ONEPASS, _AMAX, _QUANT = Kernel(_quant_onepass_kernel), Kernel(_amax_kernel), Kernel(_quant_kernel)


_BLOCK = 4096
# Programs per SM of the one-pass quantizer: enough to stream x at full bandwidth, few enough to be
# co-resident (the cooperative launch checks it; a refused launch falls back to two kernels).
_PROGRAMS_PER_SM = 4
_workspaces: dict = {}
_grid_cap: dict = {}
_onepass_refused: set = set()


def _workspace(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 [amax bits, arrivals, departures] zero between calls, float32 [1] scale slot) of this
    device and stream: two streams quantizing at once must not share a barrier. The scale lives
    here instead of a new tensor per call: the GEMM that reads it is enqueued on the same stream
    before the next quantization can overwrite it. Keyed by the raw stream handle: asking torch for
    a Stream object costs ~10 us of host time per call (bench/bench_host.py)."""
    key = (dev.index, torch._C._cuda_getCurrentRawStream(dev.index))
    ws = _workspaces.get(key)
    if ws is None:
        # Two allocations: cuBLASLt refuses a scale pointer that is not 16-byte aligned
        # (CUBLAS_STATUS_NOT_SUPPORTED, seen on the H200 with the scale at byte 12 of one buffer).
        ws = _workspaces[key] = (torch.zeros((3,), dtype=torch.int32, device=dev),
                                 torch.zeros((1,), dtype=torch.float32, device=dev))
    return ws


def _programs(idx: int, n: int) -> int:
    """Grid size of the one-pass quantizer on CUDA device ``idx`` for ``n`` elements."""
    cap = _grid_cap.get(idx)
    if cap is None:
        cap = _grid_cap[idx] = torch.cuda.get_device_properties(idx).multi_processor_count * _PROGRAMS_PER_SM
    return max(1, min((n + _BLOCK - 1) // _BLOCK, cap))


def _quantize_onepass(x: torch.Tensor, input_scale: torch.Tensor | None):
    # Under CUDA-graph capture the two-kernel form (replay bit-exact vs eager on the H200 at d12981f).
    # The one-pass kernel's replay once failed that check, but the cause turned out to be the eager
    # reference's scale (division by a Python scalar, see _quantize_eager), so the one-pass kernel may
    # be fine under capture; not re-measured, so capture keeps the form that was.
    dev = x.device
    if dev in _onepass_refused or torch.cuda.is_current_stream_capturing():
        return _quantize_triton(x, input_scale)
    x = x.contiguous()
    n = x.numel()
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=dev)
    ws, scale = _workspace(dev)
    static = input_scale is not None
    try:
        grid = _programs(dev.index, n)
        _ONEPASS[(grid,)](x, y, ws, scale, n, grid, float(input_scale) if static else 1.0, static, _BLOCK, 0,
                          launch_cooperative_grid=True)
    except RuntimeError as e:  # e.g. CUDA refuses the cooperative launch on this GPU / MPS share
        log.info("HybridQuant: one-pass FP8 activation quantizer unavailable on %s (%s); using two kernels",
                 dev, e)
        _onepass_refused.add(dev)
        return _quantize_triton(x, input_scale)
    return y, scale


def _quantize_triton(x: torch.Tensor, input_scale: torch.Tensor | None):
    x = x.contiguous()
    n = x.numel()
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    grid = (ceil_div(n, _BLOCK),)
    if input_scale is None:
        bits = torch.zeros((1,), dtype=torch.int32, device=x.device)
        _AMAX[grid](x, bits, n, _BLOCK)
        _QUANT[grid](x, y, bits, scale, n, 1.0, False, _BLOCK)
    else:
        # A static scale: one pass, the scale is a kernel argument (read once per layer, cached).
        _QUANT[grid](x, y, scale, scale, n, float(input_scale), True, _BLOCK)
    return y, scale


def _quantize_eager(x: torch.Tensor, input_scale: torch.Tensor | None):
    if input_scale is None:
        # Divided by a tensor, not the Python float: PyTorch's CUDA division by a scalar multiplies by
        # its reciprocal, one ulp off the IEEE quotient for some amax (e.g. 5.0625 / 448 on the H200),
        # while the Triton kernels divide exactly (div_rn).
        amax = x.abs().amax().to(torch.float32).clamp_min(_AMAX_FLOOR)
        scale = amax / torch.full((), E4M3_MAX, dtype=torch.float32, device=x.device)
    else:
        scale = torch.as_tensor(input_scale, dtype=torch.float32, device=x.device).reshape(())
    y = (x.to(torch.float32) / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return y, scale


_compiled = None


def _quantize_compiled(x: torch.Tensor, input_scale: torch.Tensor | None):
    global _compiled
    if input_scale is not None:
        return _quantize_eager(x, input_scale)
    if _compiled is None:
        _compiled = torch.compile(lambda t: _quantize_eager(t, None), dynamic=True)
    return _compiled(x)


QUANTIZERS = {"triton": _quantize_onepass, "triton2": _quantize_triton, "compile": _quantize_compiled,
              "eager": _quantize_eager}
_DEFAULT = "triton" if _HAVE_TRITON else "compile"


def default_quantizer() -> str:
    return _DEFAULT


def quantize_activation(x: torch.Tensor, input_scale: torch.Tensor | None = None, impl: str | None = None):
    """e4m3fn codes of ``x`` and their float32 scale (one element, on ``x.device``; from the one-pass
    kernel a per-stream slot, valid until the next quantization on that stream)."""
    impl = impl or _DEFAULT
    if impl.startswith("triton") and (not _HAVE_TRITON or x.device.type != "cuda" or torch.compiler.is_compiling()):
        impl = "eager"  # under torch.compile the eager math is traced and fused by Inductor
    return QUANTIZERS[impl](x, input_scale)


# Rows from which the FP8 GEMM runs (fewer: the 8-bit GEMV, ``matmul_small``). GPU-only per layer on the
# H200 (bench/bench_layers.py, bench/RESULTS_LAYERS_H200.json) the FP8 GEMM beats the cast + bf16 GEMM
# (``matmul_small.scaled_dequant``, the old choice below 128 rows or 4e9 multiply-adds, a rule measured on
# an H100 with host-bound timers) at every Flux shape and M >= 32: e.g. M = 256, K = N = 3072: 0.64x bf16
# against 0.23x; the cast path writes and reads a bf16 copy of the whole weight per call.
MIN_ROWS = 17


def worth_it(m_rows: int) -> bool:
    """Whether the FP8 GEMM beats the other 8-bit paths for this many rows (measured rule, above)."""
    return m_rows >= MIN_ROWS


def shapes_supported(n_out: int, k_in: int) -> bool:
    """cuBLAS FP8 GEMM needs K and N multiples of 16."""
    return k_in % 16 == 0 and n_out % 16 == 0


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               input_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               impl: str | None = None) -> torch.Tensor:
    """``x @ dequant(w).T + bias`` via ``torch._scaled_mm``; ``x`` [..., K], ``w`` FP8 [N, K]."""
    w_t, scale_b = gemm_operands(w, w_scale)
    return fp8_linear_prepared(x, w_t, scale_b, bias, input_scale, out_dtype, impl)


def gemm_operands(w: torch.Tensor, w_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``w.t()``, float32 [1] weight scale): the GEMM's second operand and ``scale_b``. A layer caches
    them (``linear_paths``): three tensor ops per call cost ~5-8 us of host time."""
    return w.t(), w_scale.to(torch.float32).reshape(1)


def fp8_linear_prepared(x: torch.Tensor, w_t: torch.Tensor, scale_b: torch.Tensor, bias: torch.Tensor | None = None,
                        input_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                        impl: str | None = None) -> torch.Tensor:
    """``fp8_linear`` on ``gemm_operands``' output."""
    out_dtype = out_dtype or x.dtype
    k = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    xq, x_scale = quantize_activation(x2, input_scale, impl)
    if x_scale.dim() != 1:
        x_scale = x_scale.reshape(1)
    use_bias = bias is not None and out_dtype in (torch.bfloat16, torch.float16)
    if use_bias and bias.dtype != out_dtype:
        bias = bias.to(out_dtype)
    out = torch._scaled_mm(xq, w_t, scale_a=x_scale, scale_b=scale_b, bias=bias if use_bias else None,
                           out_dtype=out_dtype)
    if bias is not None and not use_bias:
        out = out + bias.to(out_dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], w_t.shape[1])


def row_scale_b(w_scale: torch.Tensor, n_out: int) -> torch.Tensor:
    """The weight scale as the contiguous float32 [1, N] ``scale_b`` of a row-wise ``_scaled_mm``.

    A per-row scale ([N] or [N, 1], float32) is a free view; a tensorwise scalar is expanded once --
    callers cache the result per layer and device (``linear_paths``), so there is no per-call copy."""
    s = w_scale.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(1, 1).expand(1, n_out).contiguous()
    if s.numel() != n_out:
        raise ValueError(f"fp8 row-wise: weight scale must be a scalar or one per output row ({n_out}), "
                         f"got {s.numel()}")
    return s.reshape(1, n_out).contiguous()


def fp8_rowwise_linear(x: torch.Tensor, w: torch.Tensor, scale_b: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(w).T + bias`` via row-wise ``torch._scaled_mm`` (SM 8.9+): per-token e4m3
    activations (``act_quant``, one launch) with ``scale_a`` [M, 1] and ``scale_b`` [1, N] float32
    (``row_scale_b``). Row-wise scaling has a bf16 output only: fp16 inputs get a cast at the end."""
    return fp8_rowwise_prepared(x, w.t(), scale_b, bias)


def fp8_rowwise_prepared(x: torch.Tensor, w_t: torch.Tensor, scale_b: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``fp8_rowwise_linear`` on a cached ``w.t()`` and ``row_scale_b`` (``linear_paths`` keeps both per layer)."""
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    xq, sx = act_quant.quantize_rows(x2, torch.float8_e4m3fn)
    if bias is not None and bias.dtype != torch.bfloat16:
        bias = bias.to(torch.bfloat16)
    out = torch._scaled_mm(xq, w_t, scale_a=sx, scale_b=scale_b, bias=bias, out_dtype=torch.bfloat16)
    if x.dtype != torch.bfloat16:
        out = out.to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*lead, w_t.shape[1])


def fp8_rowwise_fused(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``fp8_rowwise_linear``'s result from the fused W8A8 GEMM (``w8a8_gemm``, Triton) instead of
    ``torch._scaled_mm``: the same per-token e4m3 codes, float32 accumulation, then
    ``(acc * sx[m]) * sw[n] + bias`` in float32 rounded once to ``x.dtype`` (bf16 or fp16: no extra
    cast). ``w`` is the stored [N, K] weight, ``w_scale`` float32, a scalar or one per output row."""
    return w8a8_gemm.linear(x, w, w_scale, bias, act_quant.quantize_rows, torch.float8_e4m3fn)


def fp8_linear_fused(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                     input_scale: float | None = None) -> torch.Tensor:
    """``fp8_linear``'s result from the fused W8A8 GEMM (``w8a8_gemm``) instead of ``torch._scaled_mm``:
    the same tensorwise e4m3 activation codes and scale (``quantize_activation``: the one-pass
    quantizer, or the file's calibrated ``input_scale``), then ``(acc * s_x) * s_w + bias`` rounded
    once to ``x.dtype``."""
    return w8a8_gemm.linear(x, w, w_scale, bias, quantize_activation, input_scale)


# At the end: these read _HAVE_TRITON from this module (a top-level import would be circular).
from . import act_quant, w8a8_gemm  # noqa: E402
