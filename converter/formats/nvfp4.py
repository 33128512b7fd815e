"""NVFP4: E2M1 (FP4) elements, an e4m3 scale per 1×16 block and one float32 global scale. Name ``nvfp4``.

The layout stock ComfyUI / comfy-kitchen read and Blackwell FP4 GEMMs consume; matched bit for bit
with comfy-kitchen's ``quantize_nvfp4`` (given the same global scale).

Spec (M = out_features, N = in_features; logical shape from the caller)
-----------------------------------------------------------------------
- ``weight``: uint8 ``[roundup(M,16), roundup(N,16)/2]``, two E2M1 codes per byte, the EVEN element
  (column ``2k``) in the HIGH nibble. Padding rows/columns hold code 0.
- ``weight_scale``: ``float8_e4m3fn`` block scales, one per 1×16 block of the padded weight (a
  ``[roundup(M,16), roundup(N,16)/16]`` matrix), stored in the cuBLAS blocked layout
  (``blocked_layout.py``).
- ``weight_scale_2``: float32 ``[]`` global scale ``s2 = amax(|W|) / (448 * 6)`` (float32 division).
- E2M1 code: bit 3 sign, bits 2..0 magnitude index into ``[0, 0.5, 1, 1.5, 2, 3, 4, 6]``.

Encoding (all float32):
- block scale ``b = e4m3(min((block_amax / 6) / s2, 448))``: round to nearest even; it may round to
  an e4m3 subnormal or to 0 for blocks far below the tensor's amax. ``s2 == 0`` (all-zero weight)
  gives ``b = 0``.
- per-element scale ``S = s2 * float(b)`` (one float32 product); ``x = w / S``, or 0 where ``S == 0``.
- ``x`` clamped to ±6 and rounded to the nearest E2M1 value, ties to the even code (0.25 -> 0,
  0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4). The sign bit is kept for values that
  round to zero (``-0.1`` -> code 8, "-0"), as comfy-kitchen does; where ``S == 0`` the code is 0.
- Decoding: ``w = value(code) * S``.
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
    expand_blocks,
    padded_blocks,
    require_finite,
    row_chunks,
)
from .base import FormatError, TensorSpec, ceil_div, require
from .blocked_layout import to_blocked
from .spec import FormatSpec, Variant

BLOCK = 16
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between consecutive magnitudes and whether a value exactly on it goes UP (the upper
# neighbour has the even code) — round-to-nearest-even on the 3-bit magnitude index.
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
# As bucketize boundaries: index = #{b : a > b}; "a >= m" is "a > (the float below m)".
_BOUNDS = torch.tensor([m for m, _ in _MIDPOINTS], dtype=torch.float32)
_BOUNDS = torch.where(torch.tensor([up for _, up in _MIDPOINTS]), torch.nextafter(_BOUNDS, torch.zeros(())), _BOUNDS)
_bounds_cache: dict = {}


def e2m1_magnitude_index(a: torch.Tensor) -> torch.Tensor:
    """|x| (float32, already <= 6) -> magnitude index 0..7, round to nearest, ties to even index."""
    key = str(a.device)
    if key not in _bounds_cache:
        _bounds_cache[key] = _BOUNDS.to(a.device)
    return torch.bucketize(a, _bounds_cache[key], out_int32=True).to(torch.uint8)


_values_cache: dict[str, torch.Tensor] = {}


def _values(device) -> torch.Tensor:
    """code -> value table (codes 8..15 negative; code 8 is -0), built once per device: building it
    per call copied it host->device on every dequantization, which costs a sync-free but per-call
    transfer and makes the call impossible to capture in a CUDA graph."""
    key = str(torch.device(device))
    table = _values_cache.get(key)
    if table is None:
        v = torch.tensor(E2M1_VALUES, dtype=torch.float32)
        table = _values_cache[key] = torch.cat([v, -v]).to(device)
    return table


class NVFP4(BlockScaledCodec):
    BLOCK = BLOCK
    spec = FormatSpec(
        name="nvfp4", label="NVFP4", family="nvfp4", color="#d8505a",
        summary="4-bit float with an FP8 scale per 16 weights: about a quarter of bf16's size; our Triton "
                "4-bit kernels on NVIDIA SM 8.9+ (Ada, Hopper, Blackwell), dequantized elsewhere",
        variants=(Variant("", "NVFP4 (4-bit, scale per 16 weights)"),), storage="padded", four_bit=True,
        clipping=True, kernels={"triton_cuda": "dq4"}, aliases=("nvfp4", "fp4", "4-bit", "4bit", "blackwell"),
        advice=(("bnb_nf4", {"blocksize": 64}),), budget_steps=({},))

    def logical_shape(self, stored, meta=None):
        # Two codes per byte; without orig_shape the padded [rows, 2*cols] is the best guess.
        return (int(stored[0]), 2 * int(stored[1])) if len(stored) == 2 else None

    def heuristic_reason(self, shape, opts):
        m, n = shape
        return f"heur: {m}x{n} not a multiple of 16 (NVFP4 pads)" if m % BLOCK or n % BLOCK else None

    # ---- layout (padding, blocked scales: BlockScaledCodec) -------------------------------------
    def output_specs(self, shape, **opts) -> dict[str, TensorSpec]:
        self.check_opts(opts)
        mp, np_ = self.padded_shape(shape)
        return {
            "weight": TensorSpec(torch.uint8, (mp, np_ // 2)),
            "weight_scale": TensorSpec(torch.float8_e4m3fn, self.scale_storage_shape(shape)),
            "weight_scale_2": TensorSpec(torch.float32, ()),
        }

    # ---- scale decomposition ------------------------------------------------------------------
    def scale_params(self, w: torch.Tensor, amax: torch.Tensor | None = None, name: str = "weight", **opts) -> dict[str, torch.Tensor]:
        """``{"weight_scale": e4m3 [M, ceil(N/16)], "weight_scale_2": f32 []}`` (not swizzled).

        With ``amax`` (block grid) given, the global scale is derived from ``amax.max()``.
        """
        self.check_opts(opts)
        w = check_weight(w, name)
        amax = block_amax_or_given(w, BLOCK, amax, name).to(device=w.device, dtype=torch.float32)
        s2 = div_const(amax.max(), E4M3_MAX * E2M1_MAX)
        b = div_const(amax, E2M1_MAX) / torch.where(s2 > 0, s2, torch.ones_like(s2))
        b = torch.where(s2 > 0, b, torch.zeros_like(b)).clamp(max=E4M3_MAX)
        return {"weight_scale": b.to(torch.float8_e4m3fn), "weight_scale_2": s2.reshape(())}

    @staticmethod
    def _block_scale(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float32 ``[M, nb]`` ``S = s2 * b`` (a single float32 product, as the decoders compute it)."""
        return params["weight_scale_2"].to(torch.float32) * params["weight_scale"].to(torch.float32)

    def element_scale(self, params: Mapping[str, torch.Tensor], shape, **opts) -> torch.Tensor:
        return expand_blocks(self._block_scale(params), check_shape(shape), BLOCK)

    def round_to_grid(self, x: torch.Tensor, **opts) -> torch.Tensor:
        x = torch.nan_to_num(x.to(torch.float32), nan=0.0).clamp(-E2M1_MAX, E2M1_MAX)
        mag = _values(x.device)[e2m1_magnitude_index(x.abs()).long()]
        return torch.where(torch.signbit(x), -mag, mag)

    # ---- encode / decode ----------------------------------------------------------------------
    def quantize(self, w: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None, name: str = "weight", **opts) -> dict[str, torch.Tensor]:
        self.check_opts(opts)
        w = check_weight(w, name)
        m, n = w.shape
        if params is None:
            params = self.scale_params(w, name=name)  # one pass for the block maxima (and NaN/Inf)
            checked = True
        else:
            checked = False
        nb = ceil_div(n, BLOCK)
        b = params["weight_scale"]
        s2 = params["weight_scale_2"]
        if b.dtype != torch.float8_e4m3fn or tuple(b.shape) != (m, nb) or s2.numel() != 1:
            raise FormatError(f"{name}: nvfp4 scale params must be e4m3 [{m}, {nb}] block scales and a one-element global scale")
        b, s2 = b.to(w.device), s2.to(device=w.device, dtype=torch.float32).reshape(())
        scale = self._block_scale({"weight_scale": b, "weight_scale_2": s2})  # [m, nb]
        mp, np_ = self.padded_shape((m, n))
        packed = torch.zeros((mp, np_ // 2), dtype=torch.uint8, device=w.device)
        for r0, r1 in row_chunks(m, np_, w.device):
            blocks = padded_blocks(w, r0, r1, BLOCK)
            if not checked:
                require_finite(amax_of_blocks(blocks), w, name)
            s = scale[r0:r1].unsqueeze(-1)
            nz = s != 0
            blocks.div_(torch.where(nz, s, torch.ones_like(s)))  # a division, as comfy-kitchen does
            blocks.masked_fill_(~nz, 0.0).clamp_(-E2M1_MAX, E2M1_MAX)
            sign = torch.signbit(blocks).to(torch.uint8) << 3  # kept for values rounding to 0
            codes = (e2m1_magnitude_index(blocks.abs_()) | sign).view(r1 - r0, np_)
            packed[r0:r1] = (codes[:, 0::2] << 4) | codes[:, 1::2]
        grid = torch.zeros((mp, nb), dtype=torch.float8_e4m3fn, device=w.device)
        grid[:m] = b
        return {"weight": packed, "weight_scale": to_blocked(grid), "weight_scale_2": s2.clone()}

    def logical_params(self, tensors: Mapping[str, torch.Tensor], shape, layer: str = "layer") -> dict[str, torch.Tensor]:
        """``{"weight_scale": e4m3 [M, ceil(N/16)], "weight_scale_2": f32 []}`` of a stored layer."""
        b = self.logical_scale_grid(tensors["weight_scale"], shape, f"{layer}.weight_scale")
        return {"weight_scale": b, "weight_scale_2": tensors["weight_scale_2"].reshape(())}

    def stored_scale_params(self, tensors: Mapping[str, torch.Tensor], shape, layer: str = "layer") -> dict[str, torch.Tensor]:
        """The ``scale_params`` that reproduce a stored layer's scales (for requantizing in place)."""
        self.validate(layer, tensors, shape)
        return self.logical_params(tensors, shape, layer)

    def dequantize(self, tensors: Mapping[str, torch.Tensor], shape, dtype: torch.dtype = torch.float32, layer: str = "layer", **opts) -> torch.Tensor:
        self.validate(layer, tensors, shape)
        m, n = check_shape(shape)
        packed = tensors["weight"]
        codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(packed.shape[0], -1)[:m, :n]
        vals = _values(packed.device)[codes.long()]
        return (vals * self.element_scale(self.logical_params(tensors, (m, n), layer), (m, n))).to(dtype)

    def validate(self, layer: str, tensors: Mapping[str, torch.Tensor], shape, **opts) -> None:
        shape = self.checked_layer_shape(layer, shape, opts)
        specs = self.output_specs(shape)
        require(layer, tensors, "weight", torch.uint8, specs["weight"].shape)
        require(layer, tensors, "weight_scale", torch.float8_e4m3fn, specs["weight_scale"].shape)
        s2 = require(layer, tensors, "weight_scale_2", torch.float32)
        if s2.numel() != 1:  # 0-dim as written; [1] from older tools is read too
            raise FormatError(f"{layer}.weight_scale_2: expected a one-element global scale, found shape {tuple(s2.shape)}")
