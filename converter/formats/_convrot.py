"""The ConvRot rotation shared by ``convrot_w4a4`` and ``asym_w4a8_int8`` (comfy-kitchen's layouts).

ConvRot multiplies every group of ``g`` consecutive input columns by the normalized *regular*
Hadamard matrix ``H_g`` (``g`` a power of 4: the Kronecker powers of the 4x4 regular Hadamard
``[[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]]``, divided by ``sqrt(g)``). ``H_g`` is symmetric and
orthogonal, so the same product rotates a weight into the stored basis and back out of it.

Exactness: comfy-kitchen rotates in the weight's own dtype with one batched ``matmul`` of the
``[M, N/g, g]`` view by ``H.T``; the entries of ``H`` are ``±2^-k`` (exact in every float dtype), and
we issue the same product so the rotated values, and hence every code, are bit-identical.
"""

from __future__ import annotations

import torch

from .base import FormatError

_cache: dict = {}


def check_groupsize(g) -> int:
    if isinstance(g, bool) or not isinstance(g, int) or g < 4 or (g & (g - 1)) or (g.bit_length() - 1) % 2:
        raise FormatError(f"convrot_groupsize must be a power of 4 (4, 16, 64, 256 ...), got {g!r}")
    return g


def hadamard(g: int, device, dtype) -> torch.Tensor:
    key = (g, str(device), dtype)
    h = _cache.get(key)
    if h is None:
        h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=dtype, device=device)
        h = h4
        while h.shape[0] < g:
            h = torch.kron(h, h4)
        h = _cache[key] = h / (g ** 0.5)
    return h


def rotate(w: torch.Tensor, g: int) -> torch.Tensor:
    """``w`` [M, N] with each group of ``g`` columns multiplied by ``H_g`` (in ``w``'s dtype)."""
    m, n = w.shape
    h = hadamard(g, w.device, w.dtype)
    return torch.matmul(w.reshape(m, n // g, g), h.T).reshape(m, n)


def pack_low_first(codes: torch.Tensor) -> torch.Tensor:
    """[M, N] nibbles (int32, any sign: masked) -> int8 [M, N/2], the EVEN column in the LOW nibble."""
    return ((codes[:, 0::2] & 0xF) | ((codes[:, 1::2] & 0xF) << 4)).to(torch.int8)


def unpack_low_first(packed: torch.Tensor) -> torch.Tensor:
    """int8 [M, N/2] -> int32 [M, N] unsigned nibbles 0..15."""
    p = packed.to(torch.int32) & 0xFF
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(packed.shape[0], -1)
