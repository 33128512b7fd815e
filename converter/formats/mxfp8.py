"""MXFP8: FP8 E4M3 elements with one power-of-two (E8M0) scale per 1×32 block. Format name ``mxfp8``.

This is the layout stock ComfyUI / comfy-kitchen read and Blackwell GEMMs consume directly.

Spec (M = out_features, N = in_features; the logical shape comes from the caller, never from storage)
--------------------------------------------------------------------------------------------------
- ``weight``: ``float8_e4m3fn`` ``[roundup(M,32), roundup(N,32)]``; rows/columns beyond ``[M, N]``
  are zero.
- ``weight_scale``: ``uint8`` E8M0 codes, one per 1×32 block along N of the padded weight (a
  ``[roundup(M,32), roundup(N,32)/32]`` matrix), stored in the cuBLAS blocked layout
  (``blocked_layout.py``), i.e. as ``[roundup(M32,128), roundup(N32/32,4)]``. Readers also accept
  the same bytes typed ``float8_e8m0fnu`` (what comfy-kitchen's tensors hold in memory).
- Code ``c`` decodes to ``2^(c-127)``, except code 0, which decodes to 0 (all-zero blocks, padding).
- Block scale: ``c = ceil(log2(block_amax / 448)) + 127`` clamped to ``[1, 254]`` for a block with a
  nonzero amax; 0 for an all-zero block. The ceiling guarantees ``|w| / 2^(c-127) <= 448`` so no
  element saturates. ``ceil(log2(.))`` is computed exactly from the float32 exponent bits
  (``frexp``), not with a floating-point ``log2`` that can round ``2^k·(1+ε)`` down to ``k``.
  (Clamping to 1, not 0, only matters for blocks with amax < 448·2^-127 ≈ 2.6e-36: code 0 would
  decode them to 0 here but to ``2^-127`` on hardware that reads E8M0 literally; code 1 is exact.)
- Elements: ``q = e4m3(w / 2^(c-127))``, round to nearest even, saturating at ±448 (the clamp comes
  before the cast because older torch casts do not saturate). Division by a power of two is exact,
  so the only rounding is the one e4m3 cast.
- Dequantize: ``w ≈ q.float() * 2^(c-127)`` (0 for code 0).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._blocks import (
    E4M3_MAX,
    BlockScaledCodec,
    amax_of_blocks,
    block_amax_or_given,
    check_shape,
    check_weight,
    div_const,
    e4m3_saturate,
    expand_blocks,
    padded_blocks,
    require_finite,
    row_chunks,
)
from .base import FormatError, TensorSpec, ceil_div, require
from .blocked_layout import to_blocked
from .spec import FormatSpec, Variant

BLOCK = 32
E8M0_BIAS = 127
_E8M0_DTYPE = getattr(torch, "float8_e8m0fnu", None)


def e8m0_codes_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes ``ceil(log2(amax/448)) + 127`` clamped to [1, 254]; 0 where amax == 0."""
    q = div_const(amax.to(torch.float32), E4M3_MAX)
    mant, exp = torch.frexp(q)  # q = mant * 2^exp, mant in [0.5, 1): log2 q is exact iff mant == 0.5
    e = exp.to(torch.int32) - (mant == 0.5).to(torch.int32)
    codes = (e + E8M0_BIAS).clamp(1, 254)
    return torch.where(amax > 0, codes, torch.zeros_like(codes)).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes -> float32 ``2^(c-127)``; code 0 -> 0."""
    c = codes.to(torch.int32)
    s = torch.ldexp(torch.ones_like(c, dtype=torch.float32), c - E8M0_BIAS)
    return torch.where(c == 0, torch.zeros_like(s), s)


def e8m0_inverse(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes -> float32 ``2^(127-c)`` (exact, subnormal for c = 254); code 0 -> 0."""
    c = codes.to(torch.int32)
    s = torch.ldexp(torch.ones_like(c, dtype=torch.float32), E8M0_BIAS - c)
    return torch.where(c == 0, torch.zeros_like(s), s)


def as_e8m0_codes(t: torch.Tensor, name: str) -> torch.Tensor:
    """Accept uint8 codes or the same bytes typed float8_e8m0fnu; return uint8."""
    if t.dtype == torch.uint8:
        return t
    if _E8M0_DTYPE is not None and t.dtype == _E8M0_DTYPE:
        return t.view(torch.uint8)
    raise FormatError(f"{name}: expected dtype torch.uint8 (E8M0 codes), found {t.dtype}")


class MXFP8(BlockScaledCodec):
    BLOCK = BLOCK
    spec = FormatSpec(
        name="mxfp8", label="MXFP8", family="mxfp8", color="#3fae6a",
        summary="8-bit float with a power-of-two scale per 32 weights: lower error than FP8 per tensor; "
                "native block-scaled matmul on Blackwell (RTX 50xx, B200), re-expressed as FP8 on Ada/Hopper",
        variants=(Variant("", "MXFP8 (scale per 32 weights)"),), storage="padded",
        kernels={"mx_blockscaled": "mx", "fp8_tensorwise": "fp8@load"},
        aliases=("mxfp8", "mx", "fp8", "microscaling", "blackwell"),
        advice=(("float8_e4m3fn_rowwise", {}),))

    def logical_shape(self, stored, meta=None):
        # Written without orig_shape by other tools: the padded shape is the best guess; a module's
        # own shape wins at load (validate crops to it).
        return (int(stored[0]), int(stored[1])) if len(stored) == 2 else None

    def heuristic_reason(self, shape, opts):
        n = shape[1]
        return f"heur: in_features {n} not a multiple of 32 (MXFP8 pads)" if n % BLOCK else None

    # ---- layout (padding, blocked scales: BlockScaledCodec) -------------------------------------
    def output_specs(self, shape, **opts) -> dict[str, TensorSpec]:
        self.check_opts(opts)
        return {
            "weight": TensorSpec(torch.float8_e4m3fn, self.padded_shape(shape)),
            "weight_scale": TensorSpec(torch.uint8, self.scale_storage_shape(shape)),
        }

    # ---- scale decomposition ------------------------------------------------------------------
    def scale_params(self, w: torch.Tensor, amax: torch.Tensor | None = None, name: str = "weight", **opts) -> dict[str, torch.Tensor]:
        """``{"weight_scale": uint8 E8M0 codes [M, ceil(N/32)]}`` (logical grid, not swizzled)."""
        self.check_opts(opts)
        w = check_weight(w, name)
        amax = block_amax_or_given(w, BLOCK, amax, name)
        return {"weight_scale": e8m0_codes_from_amax(amax.to(w.device))}

    def element_scale(self, params: Mapping[str, torch.Tensor], shape, **opts) -> torch.Tensor:
        """float32 ``[M, N]``: ``2^(c-127)`` per element, 0 in all-zero blocks (code 0)."""
        shape = check_shape(shape)
        codes = as_e8m0_codes(params["weight_scale"], "weight_scale")
        return expand_blocks(e8m0_decode(codes), shape, BLOCK)

    def round_to_grid(self, x: torch.Tensor, **opts) -> torch.Tensor:
        return e4m3_saturate(x.to(torch.float32)).to(torch.float32)

    # ---- encode / decode ----------------------------------------------------------------------
    def quantize(self, w: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None, name: str = "weight", **opts) -> dict[str, torch.Tensor]:
        self.check_opts(opts)
        w = check_weight(w, name)
        m, n = w.shape
        nb = ceil_div(n, BLOCK)
        given = None
        if params is not None:
            given = as_e8m0_codes(params["weight_scale"], f"{name}_scale").to(w.device)
            if tuple(given.shape) != (m, nb):
                raise FormatError(f"{name}: scale params have shape {tuple(given.shape)}, expected {(m, nb)}")
        mp, np_ = self.padded_shape((m, n))
        q = torch.zeros((mp, np_), dtype=torch.float8_e4m3fn, device=w.device)
        grid = torch.zeros((mp, nb), dtype=torch.uint8, device=w.device)  # padding rows: code 0
        for r0, r1 in row_chunks(m, np_, w.device):
            blocks = padded_blocks(w, r0, r1, BLOCK)
            amax = amax_of_blocks(blocks)
            require_finite(amax, w, name)
            codes = e8m0_codes_from_amax(amax) if given is None else given[r0:r1]
            grid[r0:r1] = codes
            # x = w / 2^e as w * 2^-e: both are the exactly rounded value of the same real number.
            blocks.mul_(e8m0_inverse(codes).unsqueeze(-1))
            blocks.masked_fill_((codes == 0).unsqueeze(-1), 0.0)  # code-0 blocks store +0
            q[r0:r1] = blocks.clamp_(-E4M3_MAX, E4M3_MAX).view(r1 - r0, np_).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale": to_blocked(grid)}

    def logical_codes(self, tensors: Mapping[str, torch.Tensor], shape, layer: str = "weight") -> torch.Tensor:
        """The uint8 E8M0 codes ``[M, ceil(N/32)]`` of a stored layer (un-swizzled, cropped)."""
        codes = as_e8m0_codes(tensors["weight_scale"], f"{layer}.weight_scale")
        return self.logical_scale_grid(codes, shape, f"{layer}.weight_scale")

    def stored_scale_params(self, tensors: Mapping[str, torch.Tensor], shape, layer: str = "layer") -> dict[str, torch.Tensor]:
        """The ``scale_params`` that reproduce a stored layer's scales (for requantizing in place)."""
        self.validate(layer, tensors, shape)
        return {"weight_scale": self.logical_codes(tensors, shape, layer)}

    def dequantize(self, tensors: Mapping[str, torch.Tensor], shape, dtype: torch.dtype = torch.float32, **opts) -> torch.Tensor:
        layer = opts.get("layer", "layer")
        self.validate(layer, tensors, shape)
        m, n = check_shape(shape)
        codes = self.logical_codes(tensors, (m, n), layer)
        np_ = self.padded_shape((m, n))[1]
        out = tensors["weight"][:m].to(torch.float32).view(m, np_ // BLOCK, BLOCK)
        out.mul_(e8m0_decode(codes).unsqueeze(-1))
        return out.view(m, np_)[:, :n].to(dtype).contiguous()

    def validate(self, layer: str, tensors: Mapping[str, torch.Tensor], shape, **opts) -> None:
        shape = self.checked_layer_shape(layer, shape, opts)
        specs = self.output_specs(shape)
        require(layer, tensors, "weight", torch.float8_e4m3fn, specs["weight"].shape)
        require(layer, tensors, "weight_scale")
        as_e8m0_codes(tensors["weight_scale"], f"{layer}.weight_scale")
        found = tuple(tensors["weight_scale"].shape)
        if found != specs["weight_scale"].shape:
            raise FormatError(
                f"{layer}.weight_scale: expected shape {specs['weight_scale'].shape} (blocked E8M0 scales for "
                f"logical weight {shape}), found {found}"
            )
