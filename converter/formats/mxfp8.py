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

from typing import Mapping

import torch

from .base import Codec, FormatError, NonFiniteError, TensorSpec, ceil_div, check_finite, require, round_up
from .blocked_layout import blocked_shape, from_blocked, to_blocked

BLOCK = 32
E4M3_MAX = 448.0
E8M0_BIAS = 127
_E8M0_DTYPE = getattr(torch, "float8_e8m0fnu", None)


def e4m3_saturate(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn, round to nearest even, saturating at ±448, NaN -> 0.

    NaN maps to 0 so that ``round_to_grid(w / S) * S`` is 0 for the S == 0 elements of all-zero
    blocks (where ``w / S`` is 0/0); finite inputs never produce NaN here.
    """
    return torch.nan_to_num(x, nan=0.0).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def check_shape(shape) -> tuple[int, int]:
    shape = tuple(int(d) for d in shape)
    if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0:
        raise FormatError(f"expected a 2-D logical weight shape with positive sizes, got {shape}")
    return shape  # type: ignore[return-value]


def check_weight(w: torch.Tensor, name: str) -> torch.Tensor:
    """A 2-D float weight, detached, in its own dtype (no copy). Finiteness is checked by the callers
    from their block maxima (NaN/Inf propagate through max), so no ``|w|``-sized temporary is made."""
    if w.dim() != 2:
        raise FormatError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise FormatError(f"{name}: expected a floating-point weight, got {w.dtype}")
    return w.detach()


# Rows are processed in chunks of about this many elements so that the float32 temporaries of a
# quantization stay small (~16 MiB on CPU) whatever the layer size: peak memory is the output plus a
# chunk. On a GPU, larger chunks (~256 MiB) keep the per-chunk launch overhead negligible.
CHUNK_ELEMS = 1 << 22
CHUNK_ELEMS_GPU = 1 << 26


def chunk_elems(device: torch.device) -> int:
    return CHUNK_ELEMS if device.type == "cpu" else CHUNK_ELEMS_GPU


def row_chunks(rows: int, cols: int, device: torch.device):
    step = max(1, chunk_elems(device) // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def padded_blocks(w: torch.Tensor, r0: int, r1: int, block: int) -> torch.Tensor:
    """float32 copy of rows ``r0:r1`` of ``w``, columns zero-padded to a multiple of ``block``,
    viewed as ``[rows, ceil(N/block), block]`` (a fresh tensor: callers may modify it in place)."""
    n = w.shape[1]
    nb = ceil_div(n, block)
    buf = torch.zeros((r1 - r0, nb * block), dtype=torch.float32, device=w.device)
    buf[:, :n] = w[r0:r1]
    return buf.view(r1 - r0, nb, block)


def amax_of_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """``|x|`` maximum over the last dim without an ``|x|`` temporary; NaN/Inf propagate."""
    # abs_ on the small result: maximum(+0, -0) may return -0 for an all-zero block
    return torch.maximum(blocks.amax(dim=-1), blocks.amin(dim=-1).neg()).abs_()


def require_finite(amax: torch.Tensor, w: torch.Tensor, name: str) -> None:
    """Block maxima are non-finite iff ``w`` holds NaN/Inf; then raise with the counts."""
    if not bool(torch.isfinite(amax).all()):
        check_finite(w, name)
        raise NonFiniteError(f"{name}: contains NaN or Inf values; refusing to quantize")


def blockwise_amax(w: torch.Tensor, block: int, name: str = "weight") -> torch.Tensor:
    """float32 amax of each 1×``block`` block along dim 1 -> ``[M, ceil(N/block)]`` (zero padding)."""
    m, n = w.shape
    out = torch.empty((m, ceil_div(n, block)), dtype=torch.float32, device=w.device)
    for r0, r1 in row_chunks(m, n, w.device):
        out[r0:r1] = amax_of_blocks(padded_blocks(w, r0, r1, block))
    require_finite(out, w, name)
    return out


def expand_blocks(s: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """``[M, nb]`` per-block values -> ``[M, N]`` per-element values."""
    m, n = shape
    return s.repeat_interleave(block, dim=1)[:, :n].reshape(m, n)


def div_const(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x / c`` correctly rounded on every device: CUDA turns a division by a Python scalar into a
    multiplication by its rounded reciprocal (1 ulp off at times), a division by a tensor it does not."""
    return x / torch.tensor(c, dtype=x.dtype, device=x.device)


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


def check_fixed_group_size(opts, fmt: str = "mxfp8", block: int = BLOCK) -> None:
    """Block-scaled formats (MXFP8, NVFP4) have a fixed block size: a ``group_size`` option, from a
    file's metadata or a caller, must agree with it."""
    gs = opts.get("group_size")
    if gs is not None and gs != block:
        raise FormatError(f"{fmt} has a fixed block size of {block}, got group_size={gs!r}")


class MXFP8(Codec):
    name = "mxfp8"

    # ---- layout -------------------------------------------------------------------------------
    @staticmethod
    def padded_shape(shape) -> tuple[int, int]:
        m, n = check_shape(shape)
        return round_up(m, BLOCK), round_up(n, BLOCK)

    def output_specs(self, shape, **opts) -> dict[str, TensorSpec]:
        check_fixed_group_size(opts)
        mp, np_ = self.padded_shape(shape)
        return {
            "weight": TensorSpec(torch.float8_e4m3fn, (mp, np_)),
            "weight_scale": TensorSpec(torch.uint8, blocked_shape(mp, np_ // BLOCK)),
        }

    # ---- scale decomposition ------------------------------------------------------------------
    def block_amax(self, w: torch.Tensor, name: str = "weight", **opts) -> torch.Tensor:
        return blockwise_amax(check_weight(w, name), BLOCK, name)

    def scale_params(self, w: torch.Tensor, amax: torch.Tensor | None = None, name: str = "weight", **opts) -> dict[str, torch.Tensor]:
        """``{"weight_scale": uint8 E8M0 codes [M, ceil(N/32)]}`` (logical grid, not swizzled)."""
        check_fixed_group_size(opts)
        w = check_weight(w, name)
        grid = (w.shape[0], ceil_div(w.shape[1], BLOCK))
        if amax is None:
            amax = blockwise_amax(w, BLOCK, name)
        elif tuple(amax.shape) != grid:
            raise FormatError(f"{name}: amax has shape {tuple(amax.shape)}, expected the block grid {grid}")
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
        check_fixed_group_size(opts)
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
        m, n = check_shape(shape)
        mp, np_ = self.padded_shape((m, n))
        codes = as_e8m0_codes(tensors["weight_scale"], f"{layer}.weight_scale")
        return from_blocked(codes, mp, np_ // BLOCK, name=f"{layer}.weight_scale")[:m, : ceil_div(n, BLOCK)]

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
        try:
            shape = check_shape(shape)
            check_fixed_group_size(opts)
        except FormatError as e:
            raise FormatError(f"{layer}: {e}") from None
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

    def metadata(self, **opts) -> dict:
        return {"format": self.name}
