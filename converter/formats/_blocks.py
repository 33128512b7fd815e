"""Block and scale helpers shared by the block-scaled (MX-style) codecs: MXFP8, NVFP4, bitsandbytes.

Each works on a 2-D float weight cut into 1×``block`` blocks along the input dimension, in row chunks
of bounded size so the float32 temporaries stay small whatever the layer size. ``BlockScaledCodec`` is
the part of the codec that MXFP8 and NVFP4 share (fixed block, padded storage, swizzled scales).
"""

from __future__ import annotations

import torch

from .base import Codec, FormatError, NonFiniteError, ceil_div, check_finite, check_shape, round_up
from .blocked_layout import blocked_shape, from_blocked

E4M3_MAX = 448.0


def e4m3_saturate(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn, round to nearest even, saturating at ±448, NaN -> 0.

    NaN maps to 0 so that ``round_to_grid(w / S) * S`` is 0 for the S == 0 elements of all-zero
    blocks (where ``w / S`` is 0/0); finite inputs never produce NaN here.
    """
    return torch.nan_to_num(x, nan=0.0).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


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


def block_amax_or_given(w: torch.Tensor, block: int, amax: torch.Tensor | None, name: str) -> torch.Tensor:
    """``amax`` checked against the 1×``block`` grid of ``w`` (a clipping search passes a shrunken one),
    or the weight's own block maxima when None."""
    grid = (w.shape[0], ceil_div(w.shape[1], block))
    if amax is None:
        return blockwise_amax(w, block, name)
    if tuple(amax.shape) != grid:
        raise FormatError(f"{name}: amax has shape {tuple(amax.shape)}, expected the block grid {grid}")
    return amax


def expand_blocks(s: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """``[M, nb]`` per-block values -> ``[M, N]`` per-element values."""
    m, n = shape
    return s.repeat_interleave(block, dim=1)[:, :n].reshape(m, n)


def div_const(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x / c`` correctly rounded on every device: CUDA turns a division by a Python scalar into a
    multiplication by its rounded reciprocal (1 ulp off at times), a division by a tensor it does not."""
    return x / torch.tensor(c, dtype=x.dtype, device=x.device)


def check_fixed_group_size(opts, fmt: str, block: int) -> None:
    """Block-scaled formats (MXFP8, NVFP4) have a fixed block size: a ``group_size`` option, from a
    file's metadata or a caller, must agree with it."""
    gs = opts.get("group_size")
    if gs is not None and gs != block:
        raise FormatError(f"{fmt} has a fixed block size of {block}, got group_size={gs!r}")


class BlockScaledCodec(Codec):
    """What MXFP8 and NVFP4 share: a fixed 1×``BLOCK`` block along N, both dimensions zero-padded to a
    multiple of ``BLOCK``, one scale per block stored in the cuBLAS blocked layout (``blocked_layout.py``).
    Subclasses set ``BLOCK`` and keep their element encoding, scale dtype and spec."""

    BLOCK: int

    @classmethod
    def padded_shape(cls, shape) -> tuple[int, int]:
        m, n = check_shape(shape)
        return round_up(m, cls.BLOCK), round_up(n, cls.BLOCK)

    @classmethod
    def scale_storage_shape(cls, shape) -> tuple[int, int]:
        """The blocked storage shape of the ``[roundup(M,BLOCK), roundup(N,BLOCK)/BLOCK]`` scale grid."""
        mp, np_ = cls.padded_shape(shape)
        return blocked_shape(mp, np_ // cls.BLOCK)

    def check_opts(self, opts) -> None:
        check_fixed_group_size(opts, self.name, self.BLOCK)

    def checked_layer_shape(self, layer: str, shape, opts) -> tuple[int, int]:
        """``validate``'s first step: the logical shape and options, errors naming ``layer``."""
        try:
            shape = check_shape(shape)
            self.check_opts(opts)
        except FormatError as e:
            raise FormatError(f"{layer}: {e}") from None
        return shape

    def block_amax(self, w: torch.Tensor, name: str = "weight", **opts) -> torch.Tensor:
        return blockwise_amax(check_weight(w, name), self.BLOCK, name)

    def logical_scale_grid(self, stored: torch.Tensor, shape, name: str) -> torch.Tensor:
        """A stored (blocked) scale tensor -> its ``[M, ceil(N/BLOCK)]`` grid, un-swizzled and cropped."""
        m, n = check_shape(shape)
        mp, np_ = self.padded_shape((m, n))
        return from_blocked(stored, mp, np_ // self.BLOCK, name=name)[:m, : ceil_div(n, self.BLOCK)]
