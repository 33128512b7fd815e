"""ConvRot W4A4: Hadamard-rotated signed 4-bit weights, one scale per row. Name ``convrot_w4a4``.

comfy-kitchen's ``TensorCoreConvRotW4A4Layout``, which current ComfyUI (0.33, ``comfy/quant_ops.py``
``QUANT_ALGOS``) loads natively and runs with int4 tensor-core MMA, rotating and quantizing the
activations per call (W4A4). Same layout in comfy-kitchen 0.2.31 (0.33's pin) and 0.2.40.

Spec (M = out_features, N = in_features; N a multiple of ``convrot_groupsize`` and of 64)
-------------------------------------------------------------------------------------------
- rotate: ``R = W`` with each group of ``g = convrot_groupsize`` (default 256) columns times the
  regular Hadamard ``H_g`` (``_convrot.py``), computed in the weight's dtype.
- ``weight``: int8 ``[M, N/2]``: codes ``q = clamp(round(R / s), -7, 7)`` (ties to even), two per byte,
  the EVEN column in the LOW nibble, two's-complement nibbles.
- ``weight_scale``: float32 ``[M]``: ``s = max(amax(|R| of the row), 1e-10) / 7`` (computed in the
  weight's dtype, then widened, as comfy-kitchen does).
- ``.comfy_quant``: ``{"format": "convrot_w4a4", "convrot_groupsize": g}`` (+ ``orig_shape``).
  ComfyUI fixes ``quant_group_size`` at 64 (a kernel constraint, not a scale grid).
- decode: ``W = (q * s) · H_g`` per group (H_g is its own inverse).

This pack's ops run it weight-only: ``x @ dequant(W).T``. The activation side (rotate ``x``, 4-bit
per-token codes) is what the core's kernel does at run time; the pack does not emulate it, so its
output is the W4A16 one, more accurate than the core's W4A4 result.
"""

from __future__ import annotations

import torch

from . import _convrot as cr
from ._blocks import check_shape, check_weight, require_finite
from .base import Codec, FormatError, TensorSpec, require
from .spec import FormatSpec, Variant

QMAX = 7
KERNEL_K = 64  # ComfyUI's quant_group_size: N must be a multiple of it for the core's MMA


def _opts(opts) -> int:
    # other keys (orig_shape, name ...) belong to the file / the caller, as for every codec
    if opts.get("quant_group_size", KERNEL_K) != KERNEL_K:
        raise FormatError(f"convrot_w4a4: quant_group_size must be {KERNEL_K}, got {opts['quant_group_size']!r}")
    return cr.check_groupsize(opts.get("convrot_groupsize", 256))


def _check_n(shape, g) -> tuple[int, int]:
    m, n = check_shape(shape)
    if n % g or n % KERNEL_K:
        raise FormatError(f"convrot_w4a4: in_features {n} must be a multiple of convrot_groupsize {g} and of {KERNEL_K}")
    return m, n


class ConvRotW4A4(Codec):
    spec = FormatSpec(
        name="convrot_w4a4", label="ConvRot W4A4", family="convrot_w4a4", color="#b5486e",
        summary="Hadamard-rotated 4-bit integers, one scale per row (current ComfyUI's native W4A4; "
                "int4 tensor cores there, dequantized by this pack's ops)",
        variants=(Variant("", "ConvRot W4A4 (4-bit, rotated, scale per row)"),), storage="padded",
        four_bit=True, custom=False, aliases=("w4a4", "convrot", "int4", "4-bit", "4bit"))

    def logical_shape(self, stored, meta=None):
        return (int(stored[0]), 2 * int(stored[1])) if len(stored) == 2 else None

    def shape_reason(self, shape, opts):
        try:
            _check_n(shape, _opts(opts))
        except FormatError as e:
            return str(e)
        return None

    def output_specs(self, shape, **opts) -> dict[str, TensorSpec]:
        m, n = _check_n(shape, _opts(opts))
        return {"weight": TensorSpec(torch.int8, (m, n // 2)), "weight_scale": TensorSpec(torch.float32, (m,))}

    def quantize(self, w: torch.Tensor, params=None, name: str = "weight", **opts) -> dict[str, torch.Tensor]:
        if params is not None:
            raise FormatError(f"{name}: convrot_w4a4 has no fixed-scale requantization (LoRA is applied on the fly)")
        g = _opts(opts)
        w = check_weight(w, name)
        _check_n(w.shape, g)
        r = cr.rotate(w, g)
        amax = r.abs().amax(dim=-1, keepdim=True)
        require_finite(amax.float(), w, name)
        s = amax.clamp(min=1e-10) / QMAX  # in the weight's dtype, as the core's quantizer
        q = (r / s).round_().clamp_(-QMAX, QMAX).to(torch.int32)
        return {"weight": cr.pack_low_first(q), "weight_scale": s.reshape(-1).to(torch.float32)}

    def dequantize(self, tensors, shape, dtype: torch.dtype = torch.float32, layer: str = "layer", **opts) -> torch.Tensor:
        self.validate(layer, tensors, shape, **opts)
        g = _opts({k: v for k, v in opts.items()})
        u = cr.unpack_low_first(tensors["weight"])
        q = torch.where(u >= 8, u - 16, u).to(torch.float32)
        r = q * tensors["weight_scale"].to(device=q.device, dtype=torch.float32).reshape(-1, 1)
        return cr.rotate(r, g).to(dtype)

    def validate(self, layer, tensors, shape, **opts) -> None:
        try:
            specs = self.output_specs(shape, **opts)
        except FormatError as e:
            raise FormatError(f"{layer}: {e}") from None
        require(layer, tensors, "weight", torch.int8, specs["weight"].shape)
        require(layer, tensors, "weight_scale", torch.float32, specs["weight_scale"].shape)

    def metadata(self, **opts) -> dict:
        return {"format": self.name, "convrot_groupsize": _opts(opts)}
