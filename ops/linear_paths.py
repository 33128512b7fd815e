"""Which matmul runs a quantized layer, per device, and the fallback when a fast path fails.

Per layer and device the path is picked once (``_pick``) from the device's path
(``capabilities.path_for``) and the layer's format:

=======================  =====================================  ==================================
device path              fast for                               everything else
=======================  =====================================  ==================================
``mx_blockscaled``       mxfp8 / hybrid_mxfp8 (block-scaled),   dequantize + ``F.linear``
                         float8_e4m3fn (tensorwise)
``fp8_tensorwise``       float8_e4m3fn incl. MX re-expressed    dequantize + ``F.linear``
                         at load (``quant_data.to_tensorwise``)
``fp8_rowwise`` feature  float8_e4m3fn_rowwise (W8A8, SM 8.9+)  dequantize + ``F.linear``
``int8_tensorcore``      int8_tensorwise +- per_row (W8A8,      dequantize + ``F.linear``
                         SM 8.0+)
``triton_cuda`` (SM8.9+)  nvfp4 / bnb_nf4 / bnb_fp4: ``dq4``      bitsandbytes ``matmul_4bit``
                         (``dequant4``: GEMV <= 16 rows, one-     (bnb layers), then dequantize
                         launch dequantize to bf16 + F.linear)
                         int5/int6_groupwise: ``dq_int``        dequantize + ``F.linear``
                         (``dequant_int``: one-launch
                         dequantize to bf16 + F.linear)
any CUDA + bitsandbytes  bnb_nf4 / bnb_fp4 (bitsandbytes        --
                         ``matmul_4bit``)
``dequant`` (CPU ...)    --                                     dequantize + ``F.linear``
=======================  =====================================  ==================================

On top of the device path, ``per_call`` picks per call by the number of rows (rules measured GPU-only
per layer on the H200, bench/bench_layers.py): the 8-bit GEMMs (FP8 tensorwise / row-wise, INT8 W8A8)
from 17 rows; tensorwise FP8 through the row-wise GEMM from ``FP8_AS_ROWWISE_MIN_ROWS``; weights whose
scale factors out of the GEMM run the Triton 8-bit GEMV (<= 16 rows), cast + GEMM + output scale on
CUDA (``matmul_small``) only where no GEMM applies. Blockwise FP8/INT8 and NVFP4 dequantize per call
(stored quantized, no full copy).
``full_precision_matrix_mult`` and any ``weight_function`` (LoRA, low-VRAM patch) force the dequantize
path: patches are defined on the float weight. A fast path that raises at run time demotes only that
layer on that device, with one log line (``capabilities.log_demotion``).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from . import capabilities as caps
from . import dequant4, dequant_int, dispatch, matmul_fp8, matmul_int8, matmul_mx, matmul_small

# W8A8 paths (per-token activations): the fewest rows that use them; fewer rows (<= 16) run the 8-bit
# GEMV. GPU-only per layer on the H200 (bench/bench_layers.py, bench/RESULTS_LAYERS_H200.md), at every
# Flux shape and M = 32..4608 the fused INT8 GEMM (0.61-1.68x bf16) and the row-wise FP8 GEMM
# (0.57-1.67x) beat the cast + bf16 GEMM they replaced below 1024 rows (0.15-0.76x: it writes and reads
# a bf16 copy of the whole weight per call); at M = 512, a text stream's length: 0.80-1.36x against
# 0.27-0.30x. (torch._int_mm's own minimum, 17, bounds only the non-fused INT8 form.)
INT8_MIN_ROWS = matmul_int8.MIN_ROWS
FP8_ROWWISE_MIN_ROWS = matmul_int8.MIN_ROWS
# The INT8 GEMM: our Triton kernel with the dequant epilogue fused (one launch after the quantizer)
# instead of torch._int_mm + epilogue. H200, GPU-only (bench/bench_layers.py): fused 0.61-1.68x bf16,
# _int_mm + epilogue 0.49-1.04x at every Flux shape and M = 32..4608.
INT8_FUSED_GEMM = True
# Tensorwise FP8 weights (MX files re-expressed at load included) through the row-wise GEMM: per-token
# activation scales from the one-program-per-row quantizer, the scalar weight scale expanded to [1, N]
# once. GPU-only on the H200 (bench/bench_layers.py) it is faster than the tensorwise form at M >= 4096
# on every Flux shape (1.10-1.67x bf16 against 1.08-1.64x; 1.42-1.49x against 1.19-1.26x for the
# K = 12288 / 15360 down projections: a tensorwise scale needs the whole activation's amax before the
# cast, i.e. two reads of an activation larger than L2, a per-token scale one) and more precise. It
# costs ~25 us more host time per call (row-wise _scaled_mm, two outputs), which matters where the
# forward is host-bound (fewer rows: a 512^2 Flux step), so it starts at FP8_AS_ROWWISE_MIN_ROWS. A
# file with a calibrated ``input_scale`` keeps the tensorwise GEMM with that scale (one pass, no amax).
# Whole model (bench/RESULTS_H200_c009feb.md, Flux 1024^2): eager 1.16-1.18x bf16 against 1.17x before (noise), under
# torch.compile 1.21x against 1.16x with the tensorwise form.
TENSORWISE_AS_ROWWISE = True
# Row-wise FP8 through the fused W8A8 Triton GEMM (``w8a8_gemm``: the INT8 path's kernel on e4m3 codes,
# path ``fp8_row_triton``, with row-wise ``_scaled_mm`` as its fallback) instead of ``_scaled_mm``.
# Why it exists: a ``_scaled_mm`` call costs 20-34 us of host time (bench/bench_host.py --ops) and the
# eager forward is host-bound at 512^2. OFF, measured on the H200 at 003e804 (bench/RESULTS_TRITON_FP8_H200.md,
# Flux 5+10 blocks, one process): on e4m3 codes with fp32 promotion every BLOCK_K (the precision of
# ``_scaled_mm``'s default) the kernel is 15% slower on the GPU (GPU-only 41.8 ms against 36.4 ms at
# 1024^2: the promotion serializes the wgmma pipeline; 1.02x bf16 against 1.18x) and the forward's host
# time moved by less than 1 ms of 16.5 ms. Its GPU tests pass (tests/test_ops_gpu.py); it stays a
# switch (``bench_model.py --knob``) to measure on other GPUs (Ada, SM 8.9, was not measured).
FP8_ROWWISE_TRITON = False
# Likewise tensorwise FP8 below FP8_AS_ROWWISE_MIN_ROWS (path ``fp8_triton``: the one-pass quantizer's
# codes and scale, then ``w8a8_gemm`` instead of tensorwise ``_scaled_mm``, which stays its fallback).
# OFF, same run: 0.85x bf16 at 512^2 against 0.94x for tensorwise ``_scaled_mm`` (GPU-only 14.1 ms
# against 12.0 ms, host 16.5 ms either way); with ``w8a8_gemm.FP8_FAST_ACCUM`` 0.90x.
FP8_TENSORWISE_TRITON = False
# From this many rows tensorwise FP8 runs the row-wise GEMM. The same run measured the Triton row-wise
# GEMM at every row count (``FP8_AS_ROWWISE_MIN_ROWS = 17`` with ``FP8_ROWWISE_TRITON``): 0.87x at 512^2;
# with ``_scaled_mm`` the rule below is the measured one (bench/RESULTS_H200_c009feb.md).
FP8_AS_ROWWISE_MIN_ROWS = 2048

FAST_ERRORS = (RuntimeError, TypeError, ValueError, NotImplementedError, AssertionError)
try:  # a Triton kernel that fails to compile or load on this GPU (CompilationError, OutOfResources,
    # PTXASError: all TritonError, none a RuntimeError) demotes the layer like any fast-path error
    from triton.errors import TritonError as _TritonError
    FAST_ERRORS += (_TritonError,)
except ImportError:  # no Triton (CPU-only installs)
    pass


def _pick(layer, x) -> str:
    key = caps.device_key(x.device)
    path = layer.hq_paths.get(key)
    if path is not None:
        return path
    path = dispatch.DEQUANT if layer.hq_fp_mm else dispatch.kernel_for(layer.hq_format, x.device)
    shape_ok = {dispatch.KERNEL_FP8: matmul_fp8.shapes_supported, dispatch.KERNEL_FP8_ROWWISE: matmul_fp8.shapes_supported,
                dispatch.KERNEL_INT8: matmul_int8.shapes_supported}.get(path)
    if shape_ok is not None and not shape_ok(layer.out_features, layer.in_features):
        path = dispatch.DEQUANT
    elif path == dispatch.KERNEL_FP8_AT_LOAD:
        path = dispatch.DEQUANT  # not re-expressed at load (loaded elsewhere): stays stored as MX
    layer.hq_paths[key] = path
    return path


def per_call(path: str, layer, x: torch.Tensor) -> list[str]:
    """The kernels to try for this call, fastest first (``dequant`` is always the last resort); the row
    thresholds are the module constants above and ``matmul_fp8.worth_it``, each with its measurement.
    """
    rows = x.numel() // x.shape[-1]
    if (path == "fp8" and TENSORWISE_AS_ROWWISE and rows >= FP8_AS_ROWWISE_MIN_ROWS
            and layer.hq_static_input_scale is None  # a calibrated input scale is the file's choice: kept
            and x.dtype in (torch.bfloat16, torch.float16) and caps.FEATURE_FP8_ROWWISE in caps.features(x.device)):
        return _fp8_rowwise(layer) + _fp8_tensorwise(layer) + ["dequant"]
    w8a8 = {"int8": INT8_MIN_ROWS, "fp8_rowwise": FP8_ROWWISE_MIN_ROWS}.get(path)
    if w8a8 is not None and rows >= w8a8 and x.dtype in (torch.bfloat16, torch.float16):
        return (_fp8_rowwise(layer) if path == "fp8_rowwise" else [path]) + per_call("small", layer, x)
    if path == "fp8" and matmul_fp8.worth_it(rows):
        return _fp8_tensorwise(layer) + ["dequant"]
    if path in ("mx", "bnb"):
        return [path, "dequant"]
    if path == "dq4":
        return _dq4_per_call(rows, layer, x)
    if path == dispatch.KERNEL_DQ_INT:  # the kernel writes bf16/fp16: an fp32 activation dequantizes
        return ([path] if x.dtype in (torch.bfloat16, torch.float16) else []) + ["dequant"]
    out = []
    if (not layer.hq_fp_mm and x.device.type == "cuda" and dispatch.scale_factors_out(layer.hq_format)
            and x.dtype in (torch.bfloat16, torch.float16)):
        if rows <= matmul_small.GEMV_MAX_ROWS and caps.triton_cuda(x.device):
            out.append("gemv")
        out.append("scaled_dequant")
    return out + ["dequant"]


def _fp8_rowwise(layer) -> list[str]:
    return _triton_first(FP8_ROWWISE_TRITON, "fp8_row_triton", "fp8_rowwise", layer)


def _fp8_tensorwise(layer) -> list[str]:
    return _triton_first(FP8_TENSORWISE_TRITON, "fp8_triton", "fp8", layer)


def _triton_first(on: bool, triton_path: str, path: str, layer) -> list[str]:
    """``[triton_path, path]`` where that Triton FP8 GEMM is switched on and the weight is e4m3
    (``w8a8_gemm`` multiplies codes of one dtype: e5m2 weights keep ``_scaled_mm``), else ``[path]``."""
    w = getattr(layer, "weight", None)
    return [triton_path, path] if on and (w is None or w.dtype is torch.float8_e4m3fn) else [path]


def run(layer, x: torch.Tensor, tensors: dict, bias, fns) -> torch.Tensor:
    if fns:  # patches are defined on the float weight
        layer.__dict__["hq_last_path"] = "dequant"
        return dequant_linear(layer, x, tensors, bias, fns)
    calls_key = (x.device, x.dtype, x.numel() // x.shape[-1])
    cache = layer.hq_paths.get("calls")
    calls = cache.get(calls_key) if cache is not None else None
    if calls is None:
        calls = _calls(layer, x, calls_key)
    for path in calls:
        try:
            out = _fast(path, layer, x, tensors, bias)
            layer.__dict__["hq_last_path"] = path  # plain attribute, not Module.__setattr__ (per call)
            return out
        except FAST_ERRORS as e:
            caps.log_demotion(layer.hq_name, path, e)
            layer.hq_paths.setdefault("demoted", set()).add((caps.device_key(x.device), path))
            layer.hq_paths.pop("calls", None)  # rebuilt without the demoted path
    layer.__dict__["hq_last_path"] = "dequant"
    return dequant_linear(layer, x, tensors, bias, fns)


# Distinct (device, dtype, rows) call lists cached per layer; more than this (e.g. a video model
# swept over many lengths) starts the cache again rather than growing it without bound.
_MAX_CALL_LISTS = 64


def _calls(layer, x, calls_key) -> tuple:
    """The fast paths to try, in order, for calls of this device / dtype / row count (``per_call`` up
    to its ``dequant``, without demoted paths), cached in ``layer.hq_paths["calls"]``: the checks
    cost more host time than a kernel launch (bench/bench_host.py)."""
    key = caps.device_key(x.device)
    demoted = layer.hq_paths.get("demoted", ())
    calls = []
    for p in per_call(_pick(layer, x), layer, x):
        if p == "dequant":
            break
        if (key, p) not in demoted:
            calls.append(p)
    cache = layer.hq_paths.setdefault("calls", {})
    if len(cache) >= _MAX_CALL_LISTS:
        cache.clear()
    cache[calls_key] = calls = tuple(calls)
    return calls


def _fast(path, layer, x, tensors, bias):
    if path == "fp8":
        w_t, scale_b = _fp8_operands(layer, tensors)
        return matmul_fp8.fp8_linear_prepared(x, w_t, scale_b, bias, input_scale=layer.hq_static_input_scale,
                                              out_dtype=x.dtype)
    if path == "int8":
        if INT8_FUSED_GEMM and x.device.type == "cuda":
            return matmul_int8.int8_linear_fused(x, tensors["weight"], tensors["weight_scale"], bias)
        return matmul_int8.int8_linear(x, tensors["weight"], tensors["weight_scale"], bias)
    if path == "fp8_rowwise":
        return matmul_fp8.fp8_rowwise_prepared(x, _weight_t(layer, tensors), _scale_b(layer, tensors), bias)
    if path == "fp8_triton":
        return matmul_fp8.fp8_linear_fused(x, tensors["weight"], tensors["weight_scale"], bias,
                                           input_scale=layer.hq_static_input_scale)
    if path == "fp8_row_triton":
        return matmul_fp8.fp8_rowwise_fused(x, tensors["weight"], tensors["weight_scale"], bias)
    if path == "gemv":
        return matmul_small.gemv(x, tensors["weight"], tensors["weight_scale"], bias)
    if path == "scaled_dequant":
        return matmul_small.scaled_dequant(x, tensors["weight"], tensors["weight_scale"], bias)
    if path == "mx":
        return matmul_mx.mx_linear(x, tensors["weight"], tensors["weight_scale"],
                                   (layer.out_features, layer.in_features), bias)
    if path == "bnb":
        return _bnb_linear(layer, x, tensors, bias)
    if path == "dq4_gemv":
        return dequant4.gemv(layer, x, tensors, bias)
    if path == "dq4":
        return dequant4.dequant_linear(layer, x, tensors, bias)
    if path == dispatch.KERNEL_DQ_INT:
        return dequant_int.dequant_linear(layer, x, tensors, bias)
    raise ValueError(path)


def _derived(layer, tensors, name: str, srcs: tuple, make) -> tuple:
    """``make(*srcs)`` (a tuple) kept in ``layer.hq_paths[name]`` as ``(*srcs, *result)`` while ``srcs`` are
    the same tensors. Only for the direct call's tensors (``layers._hq_direct``: the layer's own,
    resident ones): the cast path's tensors are per-call copies of an offloaded weight, and keeping one
    would pin it on the GPU. A move, load or ``set_weight`` drops the cache (``_hq_drop_caches``)."""
    d = layer.__dict__.get("hq_direct")
    if d is None or d[2] is not tensors:
        return make(*srcs)
    n = len(srcs)
    hit = layer.hq_paths.get(name)
    if hit is None or not all(map(operator.is_, hit[:n], srcs)):  # identity, per call: no generator
        hit = (*srcs, *make(*srcs))
        layer.hq_paths[name] = hit
    return hit[n:]


def _fp8_operands(layer, tensors):
    """``matmul_fp8.gemm_operands`` (``w.t()``, float32 scale) of the layer's weight and scale."""
    return _derived(layer, tensors, "fp8_operands", (tensors["weight"], tensors["weight_scale"]),
                    matmul_fp8.gemm_operands)


def _weight_t(layer, tensors):
    """``weight.t()``: the column-major second operand of the row-wise FP8 GEMM (a view, kept)."""
    return _derived(layer, tensors, "weight_t", (tensors["weight"],), lambda w: (w.t(),))[0]


def _scale_b(layer, tensors):
    """The [1, N] float32 weight scale of the row-wise FP8 GEMM (a tensorwise scalar is expanded)."""
    return _derived(layer, tensors, "scale_b", (tensors["weight_scale"],),
                    lambda s: (matmul_fp8.row_scale_b(s, layer.out_features),))[0]


def _dq4_per_call(rows, layer, x) -> list[str]:
    """4-bit layers with the Triton kernels: the fused GEMV for few rows, else one-launch dequantize to
    ``x.dtype`` + ``F.linear``; bitsandbytes layers keep ``matmul_4bit`` as the next fallback (first
    when ``dequant4.BNB_FIRST``). An fp32 activation skips the kernels (they write bf16/fp16)."""
    ours = []
    if x.dtype in (torch.bfloat16, torch.float16):
        ours = (["dq4_gemv"] if rows <= dequant4.GEMV_MAX_ROWS else []) + ["dq4"]
    bnb = ["bnb"] if layer.hq_bnb is not None and caps.bnb_cuda_available(x.device) else []
    return (bnb + ours if dequant4.BNB_FIRST else ours + bnb) + ["dequant"]


def dequant_linear(layer, x, tensors, bias, fns):
    """Dequantize per call (the weight stays stored quantized), apply patches, ``F.linear``."""
    w = layer.hq_dequantize(tensors, x.dtype)
    if fns:
        layer.hq_in_forward = True
        try:
            for f in fns:
                w = f(w)
        finally:
            layer.hq_in_forward = False
        if not dispatch.is_four_bit(layer.hq_format):
            # What a merged patch computes (fixed-scale requantization): low-VRAM and merged agree.
            w = layer.hq_requant_roundtrip(w)
    return F.linear(x, w.to(x.dtype), bias)


def _bnb_linear(layer, x, tensors, bias):
    """bitsandbytes ``matmul_4bit``: its 4-bit GEMV for one row, its CUDA dequantize + GEMM otherwise.

    The QuantState is rebuilt per call from the (possibly just moved) tensors: plain Python objects,
    no copies. The nested offset is the layer's ``hq_bnb_offset`` buffer: creating it on the GPU per
    call was a host-to-device copy per call (measured: 0.06 ms instead of 0.012 ms at M=1 on an H100)
    and a CPU tensor makes bitsandbytes' CUDA kernels fault (illegal memory access, seen on the H100).
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    meta = layer.hq_bnb
    state2, offset = None, None
    if "weight.nested_absmax" in tensors:
        state2 = QuantState(absmax=tensors["weight.nested_absmax"], blocksize=meta["nested_blocksize"],
                            code=tensors["weight.nested_quant_map"], dtype=getattr(torch, meta.get("nested_dtype", "float32")))
        offset = layer.hq_bnb_offset.to(x.device, non_blocking=True)
    qs = QuantState(absmax=tensors["weight.absmax"], shape=torch.Size(meta["shape"]), code=tensors["weight.quant_map"],
                    blocksize=meta["blocksize"], quant_type=meta["quant_type"], dtype=x.dtype, offset=offset, state2=state2)
    return bnb.matmul_4bit(x, tensors["weight"].t(), quant_state=qs, bias=bias)
