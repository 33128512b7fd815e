"""Hybrid MXFP8: an MXFP8 layer plus a tensorwise fallback scale. Format name ``hybrid_mxfp8``.

Blackwell runs the MXFP8 data directly; Ada/Hopper have no block-scaled FP8 GEMM and need one scale
per tensor. This layout keeps every MXFP8 byte and adds the scale such a GPU needs.

Spec (M = out_features, N = in_features; logical shape from the caller)
-----------------------------------------------------------------------
- ``weight``, ``weight_scale``: exactly as ``mxfp8`` (``mxfp8.py``), unchanged bytes.
- ``weight_scalar``: float32 ``[]``, the tensorwise scale ``s``. Default: the largest decoded block
  scale ``2^(max code - 127)`` (1.0 when every block is zero, so readers never divide by 0). Or an
  imported tensorwise scale (``scalar=``), e.g. the ``weight_scale`` of the same layer in an existing
  tensorwise FP8 file (``--tensor-scales``). Must be finite and > 0.
- ``.comfy_quant`` / header format string: ``hybrid_mxfp8``. Dequantization ignores ``weight_scalar``.

The tensorwise re-expression (``to_tensorwise_fp8``), done once at load, not per call
-------------------------------------------------------------------------------------
The raw MXFP8 codes are relative to their own block scale, so ``codes * s`` is wrong by
``2^(e_block - e_s)`` per block (0.9–30× relative weight error measured on real weights). The correct
tensorwise weight re-expresses each block relative to ``s``:
``w_t = e4m3(q * 2^(e_block) / s)`` (round to nearest even, saturating at ±448), scale ``s``.
- Power-of-two ``s`` (the default): this is an exact exponent shift ``q * 2^(e_block - e_s)`` as
  long as the result stays an e4m3 normal (>= 2^-6). With the default ``s`` no element exceeds 448, so
  nothing saturates; the shift is ≤ 0, and blocks far below the largest one lose precision only where
  a shifted value falls below 2^-6: it becomes an e4m3 subnormal (step 2^-9) and values below 2^-10
  flush to 0, i.e. an absolute error of at most ``2^-10 * s`` per element. For weights whose rows span
  2^10 the Frobenius relative error stays within a few percent of plain MXFP8's (tested).
- Non-power-of-two ``s`` (an imported FP8 tensorwise scale): the division is not a shift, so every
  element is rounded again to e4m3 (up to 2^-4 relative error per element on top of the MXFP8
  rounding), and elements whose value exceeds ``448 * s`` saturate (clipped). Prefer the default when
  the imported scale is not a power of two and not at least the largest block scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from ._blocks import check_shape, e4m3_saturate
from .base import FormatError, TensorSpec, require
from .fp8 import FP8Tensorwise
from .mxfp8 import E8M0_BIAS, MXFP8, as_e8m0_codes
from .spec import Variant

REEXPRESSED_FORMAT = FP8Tensorwise.spec.name  # what to_tensorwise_fp8's output is, as a layer format


def default_scalar(codes: torch.Tensor) -> torch.Tensor:
    """float32 ``[]``: the largest decoded block scale of uint8 E8M0 ``codes``; 1.0 if all are 0."""
    top = int(codes.max()) if codes.numel() else 0
    value = 2.0 ** (top - E8M0_BIAS) if top > 0 else 1.0
    return torch.tensor(value, dtype=torch.float32, device=codes.device)


def _scalar_tensor(scalar, device, name: str) -> torch.Tensor:
    t = torch.as_tensor(scalar, dtype=torch.float32).to(device)
    if t.numel() != 1:
        raise FormatError(f"{name}: the tensorwise scalar must have one element, got shape {tuple(t.shape)}")
    t = t.reshape(())
    if not bool(torch.isfinite(t)) or float(t) <= 0:
        raise FormatError(f"{name}: the tensorwise scalar must be finite and > 0, got {float(t)}")
    return t


def mxfp8_to_hybrid(tensors: Mapping[str, torch.Tensor], shape, scalar=None, layer: str = "layer") -> dict[str, torch.Tensor]:
    """An existing MXFP8 layer's tensors -> hybrid_mxfp8 tensors (same bytes + ``weight_scalar``)."""
    codec = MXFP8()
    codec.validate(layer, tensors, shape)
    # Same bytes; a float8_e8m0fnu-typed scale (comfy-kitchen in memory) is stored as uint8 codes.
    out = {"weight": tensors["weight"], "weight_scale": as_e8m0_codes(tensors["weight_scale"], f"{layer}.weight_scale")}
    if scalar is None:
        out["weight_scalar"] = default_scalar(codec.logical_codes(tensors, shape, layer))
    else:
        out["weight_scalar"] = _scalar_tensor(scalar, tensors["weight"].device, f"{layer}.weight_scalar")
    return out


def to_tensorwise_fp8(tensors: Mapping[str, torch.Tensor], shape, layer: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid (or plain MXFP8) layer -> ``(w float8_e4m3fn [M, N] contiguous, scale f32 [])`` with
    ``w.float() * scale ≈ dequantize``; see the module docstring for the exact error behaviour."""
    m, n = check_shape(shape)
    codec = MXFP8()
    deq = codec.dequantize(tensors, (m, n), layer=layer)  # q * 2^e_block: exact in float32
    if "weight_scalar" in tensors:
        s = _scalar_tensor(tensors["weight_scalar"], deq.device, f"{layer}.weight_scalar")
    else:
        s = default_scalar(codec.logical_codes(tensors, (m, n), layer))
    w = e4m3_saturate(deq / s).contiguous()
    return w, s.clone()


class HybridMXFP8(MXFP8):
    # MXFP8's traits (storage, kernels, advice) plus its own name and choice.
    spec = replace(
        MXFP8.spec, name="hybrid_mxfp8", label="Hybrid MXFP8", family="hybrid_mxfp8", color="#7fd49a",
        summary="MXFP8 plus one fallback scale: block-scaled matmul on Blackwell, exact FP8 re-expression "
                "on RTX 40xx / Ada and Hopper; one file for both",
        variants=(Variant("", "Hybrid MXFP8 (MXFP8 + FP8 fallback for RTX 40xx)"),),
        aliases=("hybrid", "mxfp8", "fp8", "ada", "rtx 40"))

    def output_specs(self, shape, **opts) -> dict[str, TensorSpec]:
        specs = super().output_specs(shape, **opts)
        specs["weight_scalar"] = TensorSpec(torch.float32, ())
        return specs

    def quantize(self, w: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None, name: str = "weight", scalar=None, **opts) -> dict[str, torch.Tensor]:
        out = super().quantize(w, params=params, name=name, **opts)
        if scalar is None and params is not None and "weight_scalar" in params:
            scalar = params["weight_scalar"]
        if scalar is None:
            codes = self.logical_codes(out, tuple(w.shape), name)
            out["weight_scalar"] = default_scalar(codes)
        else:
            out["weight_scalar"] = _scalar_tensor(scalar, w.device, f"{name}_scalar")
        return out

    def stored_scale_params(self, tensors: Mapping[str, torch.Tensor], shape, layer: str = "layer") -> dict[str, torch.Tensor]:
        params = super().stored_scale_params(tensors, shape, layer)
        params["weight_scalar"] = tensors["weight_scalar"].reshape(())
        return params

    def validate(self, layer: str, tensors: Mapping[str, torch.Tensor], shape, **opts) -> None:
        super().validate(layer, tensors, shape, **opts)
        s = require(layer, tensors, "weight_scalar", torch.float32)
        if s.numel() != 1:
            raise FormatError(f"{layer}.weight_scalar: expected a one-element tensorwise scale, found shape {tuple(s.shape)}")
        if not bool(torch.isfinite(s).all()) or float(s.reshape(())) <= 0:
            raise FormatError(f"{layer}.weight_scalar: must be finite and > 0, found {float(s.reshape(()))}")
