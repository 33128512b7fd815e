"""Shared body of the packed 5-bit and 6-bit group-wise integer formats (``int5.py``, ``int6.py``).

Layout (M = out_features, N = in_features, g = group size, G = ceil(N/g), Np = G*g, b = bits)
-----------------------------------------------------------------------------------------------
- Codes: symmetric integers ``q`` in ``[-qmax, qmax]``, ``qmax = 2**(b-1) - 1`` (15 for 5-bit, 31 for
  6-bit), stored unsigned as ``u = q + 2**(b-1)`` (so ``u`` is in ``1 .. 2**b - 1``; 0 is never written).
  Columns ``N .. Np-1`` of every row are zero padding (code ``2**(b-1)``).
- ``weight``: uint8 ``[M, Np*b/8]``; each row is two planes, back to back:
  ``[Np/2 bytes: low nibbles | Np*(b-4)/8 bytes: high bits]``.
  Low plane: byte ``k`` = ``(u[2k] & 15) | (u[2k+1] & 15) << 4``.
  High plane, 5-bit: byte ``k`` holds bit 4 of ``u[8k+i]`` at bit ``i`` (i = 0..7);
  6-bit: byte ``k`` holds bits 4-5 of ``u[4k+i]`` at bits ``2i, 2i+1`` (i = 0..3).
  The planes make unpacking a few uint8 shifts and masks (no 40-bit words), on every device, and
  keep the whole code of a weight in the single ``weight`` tensor (fixed-scale requantization for a
  merged LoRA rewrites only ``weight``, so ComfyUI's backup restores it exactly).
- ``weight_scale``: float16 ``[M, G]`` = ``amax(group) / qmax``, rounded to float16 (an all-zero group
  gets 1.0; a positive scale that would underflow gets float16's smallest subnormal; larger than
  float16's maximum is clamped, and the codes saturate).
- Decoded weight: ``(u - 2**(b-1)) * scale[row, col // g]``, columns ``:N`` (exact in float32).
- ``.comfy_quant``: ``{"format": name, "group_size": g, "orig_shape": [M, N]}``.

Encoding: ``q = clamp(round(w / S), -qmax, qmax)`` (round half to even) with ``S`` the stored float16
scale in float32, so ``round_to_grid(w / S) * S == dequantize(quantize(w))`` exactly. The codec
implements the rounding decomposition (``base.py``), so the data-free clipping search and GPTQ apply.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._blocks import blockwise_amax, check_weight, expand_blocks
from .base import Codec, FormatError, TensorSpec, ceil_div, require
from .grids import check_group_size, check_shape
from .spec import FormatSpec, Variant

_F16_MAX = 65504.0
_F16_TINY = 2.0 ** -24  # smallest float16 subnormal


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[M, Np]`` (``Np`` a multiple of 8, values < 2**bits) -> packed ``[M, Np*bits/8]``."""
    m, n = u.shape
    u = u.to(torch.uint8)
    lo = u[:, 0::2] & 15 | (u[:, 1::2] & 15) << 4
    hb = bits - 4
    per = 8 // hb
    hi = (u >> 4).reshape(m, n // per, per)
    shifts = torch.arange(0, 8, hb, dtype=torch.uint8, device=u.device)
    hi = (hi << shifts).sum(dim=2, dtype=torch.int32).to(torch.uint8)  # disjoint bits: sum == or
    return torch.cat([lo, hi], dim=1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The reverse of ``pack_codes``: uint8 ``[M, Np]`` codes."""
    return signed_codes(packed, bits).view(torch.uint8).add_(1 << (bits - 1))


def signed_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The symmetric integers ``q = u - 2**(bits-1)`` of packed ``[M, Np*bits/8]``: int8 ``[M, Np]``.

    Everything stays one byte per weight: the offset is subtracted in uint8 (``u`` is 1 .. 2**b - 1,
    so ``u - 2**(b-1)`` wraps to exactly the int8 bit pattern of ``q``), and the high bits are shifted
    in place, so no wider temporary and no separate float pass for the offset exists."""
    m, nb = packed.shape
    n = nb * 8 // bits
    lo = packed[:, : n // 2]
    hi = packed[:, n // 2:]
    hb = bits - 4
    shifts = torch.arange(0, 8, hb, dtype=torch.uint8, device=packed.device)
    q = torch.stack([lo & 15, lo >> 4], dim=-1).view(m, n)
    q |= (hi.unsqueeze(-1) >> shifts).bitwise_and_((1 << hb) - 1).bitwise_left_shift_(4).view(m, n)
    q -= 1 << (bits - 1)
    return q.view(torch.int8)


def group_int_spec(bits: int, *, color: str, summary: str, advice: tuple) -> FormatSpec:
    """The ``FormatSpec`` of the ``bits``-bit format: what int5 and int6 share (name, family, the one
    variant, storage, budget steps, kernel); each module passes what differs (colour, summary, advice)."""
    return FormatSpec(
        name=f"int{bits}_groupwise", label=f"INT{bits}", family=f"int{bits}", color=color, summary=summary,
        variants=(Variant("", f"INT{bits} ({bits}-bit, scale per 32 weights)", {"group_size": 32}),),
        storage="padded", clipping=True, custom=True,
        # One Triton launch decodes the packed codes straight to bf16/fp16 (ops/dequant_int.py).
        kernels={"triton_cuda": "dq_int"},
        aliases=(f"int{bits}", f"{bits}-bit", f"{bits}bit", f"q{bits}"),
        budget_steps=({"group_size": 32}, {"group_size": 64}, {"group_size": 128}),
        advice=advice)


class GroupIntCodec(Codec):
    """Group-wise symmetric ``bits``-bit integers along the input dim; subclasses set ``bits``/``spec``."""

    bits: int
    default_group_size = 32

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def group_size(self, opts: Mapping) -> int:
        """The layer's group size from its codec options (default 32), checked."""
        g = check_group_size(opts.get("group_size", self.default_group_size))
        if g % 8:
            raise FormatError(f"{self.name}: group_size must be a multiple of 8, got {g}")
        return g

    def logical_shape(self, stored, meta=None):
        return None  # padded and packed: the file's orig_shape says

    def heuristic_reason(self, shape, opts):
        g = self.group_size(dict(opts))
        return f"heur: in_features {shape[1]} not a multiple of group size {g} (pads)" if shape[1] % g else None

    def output_specs(self, shape, **opts) -> dict[str, TensorSpec]:
        m, n = check_shape(shape)
        g = self.group_size(opts)
        groups = ceil_div(n, g)
        return {"weight": TensorSpec(torch.uint8, (m, groups * g * self.bits // 8)),
                "weight_scale": TensorSpec(torch.float16, (m, groups))}

    def metadata(self, **opts) -> dict:
        return {"format": self.name, "group_size": self.group_size(opts)}

    # ---- rounding decomposition -----------------------------------------------------------------
    def block_amax(self, w: torch.Tensor, **opts) -> torch.Tensor:
        name = opts.get("name", "weight")
        return blockwise_amax(check_weight(w, name), self.group_size(opts), name)

    def scale_params(self, w: torch.Tensor, amax: torch.Tensor | None = None, **opts) -> dict[str, torch.Tensor]:
        if amax is None:
            amax = self.block_amax(w, **opts)
        a = amax.to(torch.float32)
        s = a / torch.tensor(float(self.qmax), dtype=torch.float32, device=a.device)
        s16 = s.clamp(max=_F16_MAX).to(torch.float16)
        s16 = torch.where(s16 > 0, s16, torch.where(s > 0, torch.full_like(s16, _F16_TINY), torch.ones_like(s16)))
        return {"weight_scale": s16}

    def element_scale(self, params: Mapping[str, torch.Tensor], shape, **opts) -> torch.Tensor:
        m, n = check_shape(shape)
        return expand_blocks(params["weight_scale"].to(torch.float32), (m, n), self.group_size(opts))

    def round_to_grid(self, x: torch.Tensor, **opts) -> torch.Tensor:
        return x.to(torch.float32).round().clamp_(-self.qmax, self.qmax)

    # ---- I/O ------------------------------------------------------------------------------------
    def quantize(self, w: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None, **opts) -> dict[str, torch.Tensor]:
        name = opts.get("name", "weight")
        w = check_weight(w, name)
        m, n = int(w.shape[0]), int(w.shape[1])
        g = self.group_size(opts)
        if params is None:
            params = self.scale_params(w, **opts)  # block_amax raises on NaN/Inf
        elif not bool(torch.isfinite(w.float().sum())):
            self.block_amax(w, **opts)  # raises the NonFiniteError with counts
        scale = require(name, params, "weight_scale", shape=(m, ceil_div(n, g))).to(w.device, torch.float16)
        groups = scale.shape[1]
        x = torch.zeros((m, groups * g), dtype=torch.float32, device=w.device)
        x[:, :n] = w
        x = x.reshape(m, groups, g).div_(scale.to(torch.float32).unsqueeze(-1))
        q = self.round_to_grid(x).reshape(m, groups * g)
        u = (q + (self.qmax + 1)).to(torch.uint8)
        return {"weight": pack_codes(u, self.bits), "weight_scale": scale.contiguous()}

    def dequantize(self, tensors: Mapping[str, torch.Tensor], shape, dtype: torch.dtype = torch.float32, **opts) -> torch.Tensor:
        m, n = check_shape(shape)
        g = self.group_size(opts)
        q = signed_codes(tensors["weight"], self.bits).view(m, -1, g)
        scale = tensors["weight_scale"]
        # One multiply, written in ``dtype``: the product of a 5/6-bit integer and a float16 scale is
        # exact in float32 (16 significant bits), so computing it there and rounding once to
        # ``dtype`` is the definition; float16 output computes in float16 (the same single rounding).
        sdt = torch.float16 if dtype == torch.float16 else torch.float32
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        torch.mul(q, scale.to(sdt).unsqueeze(-1), out=out)
        out = out.view(m, -1)
        return out if out.shape[1] == n else out[:, :n]

    def validate(self, layer: str, tensors: Mapping[str, torch.Tensor], shape, **opts) -> None:
        try:
            specs = self.output_specs(shape, **opts)
        except FormatError as e:
            raise FormatError(f"{layer}: {e}") from None
        for suffix, spec in specs.items():
            require(layer, tensors, suffix, dtype=spec.dtype, shape=spec.shape)
        if not bool(torch.isfinite(tensors["weight_scale"]).all()):
            raise FormatError(f"{layer}.weight_scale: contains NaN or Inf scales")
