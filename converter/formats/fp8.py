"""FP8 layouts: tensorwise (e4m3fn and e5m2), rowwise and blockwise e4m3fn.

Spec (M = out_features, N = in_features; all tensors unpadded at the logical ``[M, N]``):

============================  =================  ==============================================
format name                   ``.weight``        ``.weight_scale`` (float32)
============================  =================  ==============================================
``float8_e4m3fn``             e4m3fn ``[M, N]``  ``[]`` = amax / 448
``float8_e5m2``               e5m2 ``[M, N]``    ``[]`` = amax / 57344
``float8_e4m3fn_rowwise``     e4m3fn ``[M, N]``  ``[M]`` = row amax / 448
``float8_e4m3fn_blockwise``   e4m3fn ``[M, N]``  ``[ceil(M/bs), ceil(N/bs)]`` = tile amax / 448
============================  =================  ==============================================

- ``dequant = weight.float() * scale`` (scale broadcast over its row / tile).
- Quantize: ``q = cast(clamp(w / scale, ±max))``. The clamp matters: older torch casts do not
  saturate (e4m3fn has no Inf, an overflow would become NaN) and a clipped ``amax`` (clipping search)
  deliberately puts values past the grid's end. The cast itself rounds to nearest, ties to even.
- All-zero tensors/blocks get scale 1.0 (see ``grids.py``), never 0, so nothing divides by zero.
- Optional ``.input_scale`` float32 ``[]`` (static activation scale, read by ComfyUI's fp8 matmul):
  written when ``quantize(..., input_scale=x)`` is given a positive float / one-element tensor, and then
  also listed by ``output_specs(..., input_scale=x)``. Readers accept it on any FP8 layer.
- Options: ``group_size`` (blockwise only, default 128; written into ``.comfy_quant``), ``name`` (the
  tensor's name in error messages, default ``"weight"``), ``input_scale``. Other keys are ignored.
- The tensorwise names are the ones stock ComfyUI reads; the rowwise/blockwise names are this pack's.
- Legacy scaled-FP8 files (``scale_weight``/``scale_input``) are mapped onto ``float8_e4m3fn`` /
  ``float8_e5m2`` by ``converter.metadata``; the data layout is identical.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import FormatError, TensorSpec
from .grids import GridCodec, check_group_size
from .spec import FormatSpec, Variant

__all__ = ["to_float8_saturated", "FP8Tensorwise", "FP8E5M2Tensorwise", "FP8Rowwise", "FP8Blockwise"]


def to_float8_saturated(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Cast ``x`` to an FP8 dtype, clamping to ±finfo(dtype).max first (saturating, never NaN/Inf).

    Rounding is the cast's round-to-nearest-even. NaN inputs stay NaN: callers check finiteness first.
    """
    fmax = torch.finfo(dtype).max
    return x.clamp(-fmax, fmax).to(dtype)


def _input_scale_tensor(value, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.numel() != 1:
        raise FormatError(f"{name}: input_scale must be a single value, got shape {tuple(t.shape)}")
    t = t.reshape(()).to(device=device).clone()
    if not bool(torch.isfinite(t)) or float(t) <= 0:
        raise FormatError(f"{name}: input_scale must be finite and positive, got {float(t)}")
    return t


_DECODE_TABLES: dict[torch.dtype, torch.Tensor] = {}


def _decode_table(dtype: torch.dtype) -> torch.Tensor:
    """float32 value of each of the 256 bit patterns of an FP8 dtype, computed by torch's own cast."""
    t = _DECODE_TABLES.get(dtype)
    if t is None:
        t = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).to(torch.float32)
        _DECODE_TABLES[dtype] = t
    return t


class _FP8(GridCodec):
    storage = torch.float8_e4m3fn
    kind = "tensor"

    @property
    def qmax(self) -> float:  # 448 for e4m3fn, 57344 for e5m2
        return float(torch.finfo(self.storage).max)

    def layout(self, opts, tensors=None):
        return self.kind, 0

    def encode_(self, x: torch.Tensor) -> torch.Tensor:
        fmax = torch.finfo(self.storage).max
        return x.clamp_(-fmax, fmax).to(self.storage)  # same as to_float8_saturated, in place

    def encode_into_(self, x: torch.Tensor, out: torch.Tensor) -> None:
        fmax = torch.finfo(self.storage).max
        out.copy_(x.clamp_(-fmax, fmax))  # copy_ casts with the same kernel as .to(): no temporary

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        if q.device.type != "cpu":
            return q.to(torch.float32)
        # torch's CPU float8 -> float32 cast is a scalar loop (~3 ns/element, 5x the whole quantization);
        # a 256-entry table built BY that cast and gathered with index_select gives the same bits for
        # every pattern (NaN included) at ~0.7 ns/element.
        # every pattern (NaN included) at ~0.7 ns/element. Chunked: the int32 indices stay small.
        table = _decode_table(self.storage)
        codes = q.reshape(-1).view(torch.uint8)
        out = torch.empty(codes.shape, dtype=torch.float32)
        step = 1 << 18
        for i in range(0, codes.numel(), step):
            torch.index_select(table, 0, codes[i:i + step].to(torch.int32), out=out[i:i + step])
        return out.reshape(q.shape)

    def extra_specs(self, opts):
        if opts.get("input_scale") is None:
            return {}
        return {"input_scale": TensorSpec(torch.float32, ())}

    def extra_outputs(self, w, opts, name):
        if opts.get("input_scale") is None:
            return {}
        return {"input_scale": _input_scale_tensor(opts["input_scale"], name, w.device)}

    def validate_extra(self, layer: str, tensors: Mapping[str, torch.Tensor]) -> None:
        t = tensors.get("input_scale")
        if t is None:
            return
        if t.dtype != torch.float32 or t.numel() != 1:
            raise FormatError(f"{layer}.input_scale: expected one float32 value, found {t.dtype} {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise FormatError(f"{layer}.input_scale: not finite")


def legacy_scaled_fp8_format(marker_dtype) -> str:
    """The format of a legacy scaled-FP8 layer: the ``scaled_fp8`` marker's dtype is the FP8 dtype used
    (e5m2 -> ``float8_e5m2``); float32, another dtype or no marker at all mean e4m3fn."""
    return FP8E5M2Tensorwise.spec.name if marker_dtype == torch.float8_e5m2 else FP8Tensorwise.spec.name


class FP8Tensorwise(_FP8):
    """``float8_e4m3fn``: one float32 scale for the whole weight."""

    spec = FormatSpec(
        name="float8_e4m3fn", input_scale=True, label="FP8", family="fp8", color="#e0913a",
        summary="8-bit float, one scale per weight: half of bf16's size, near-lossless; fast FP8 matmul on "
                "RTX 40xx / Ada, Hopper and Blackwell GPUs",
        variants=(Variant("tensor", "FP8 (one scale per tensor)", note="the format stock ComfyUI loads"),),
        scale_out=True, kernels={"fp8_tensorwise": "fp8", "mx_blockscaled": "fp8"},
        aliases=("fp8", "float8", "e4m3", "8-bit", "8bit"),
        advice=(("float8_e4m3fn_rowwise", {}), ("mxfp8", {}), ("float8_e4m3fn_blockwise", {"group_size": 128})))


class FP8E5M2Tensorwise(_FP8):
    """``float8_e5m2``: one float32 scale, e5m2 storage (wider range, 2 mantissa bits)."""

    spec = FormatSpec(
        name="float8_e5m2", label="FP8 e5m2", family="fp8", color="#c9742a",
        summary="8-bit float with 2 mantissa bits (coarser than e4m3): only for files that need it",
        scale_out=True, aliases=("fp8", "e5m2"))
    storage = torch.float8_e5m2


class FP8Rowwise(_FP8):
    """``float8_e4m3fn_rowwise``: one float32 scale per output row, stored ``[M]``."""

    spec = FormatSpec(
        name="float8_e4m3fn_rowwise", input_scale=True, label="FP8 per-row", family="fp8", color="#f0b25a",
        summary="8-bit float, one scale per output row: less error than one scale per tensor, same size",
        variants=(Variant("row", "FP8 (one scale per row)"),), scale_out=True,
        kernels={"fp8_rowwise": "fp8_rowwise"},
        aliases=("fp8", "float8", "rowwise", "per-row"),
        advice=(("mxfp8", {}), ("float8_e4m3fn_blockwise", {"group_size": 128})))
    kind = "row"


class FP8Blockwise(_FP8):
    """``float8_e4m3fn_blockwise``: one float32 scale per ``group_size``² tile."""

    spec = FormatSpec(
        name="float8_e4m3fn_blockwise", input_scale=True, label="FP8 blocks", family="fp8", color="#f5c97d",
        summary="8-bit float, one scale per 128x128 tile: the lowest 8-bit float error; dequantized per call",
        variants=(Variant("block", "FP8 (one scale per 128x128 block)", {"group_size": 128}),),
        aliases=("fp8", "float8", "blockwise"))
    kind = "tile"
    default_group_size = 128

    def layout(self, opts, tensors=None):
        return "tile", check_group_size(opts.get("group_size", self.default_group_size))

    def metadata(self, **opts) -> dict:
        return {"format": self.name, "group_size": check_group_size(opts.get("group_size", self.default_group_size))}
