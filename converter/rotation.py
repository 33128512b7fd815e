"""Blockwise Hadamard rotation along the input dimension (QuaRot-style), applied around any codec.

``H_B`` is the orthonormal Sylvester Hadamard matrix of size ``B`` (a power of two):
``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]] / sqrt(2)``. It is symmetric and orthonormal, so
``H_B @ H_B = I``. "Blockwise along the input dim" means the ``N`` input columns are cut into ``N/B``
consecutive blocks of ``B`` and each block is multiplied by ``H_B``: ``rotate(x)[..., kB:(k+1)B] =
x[..., kB:(k+1)B] @ H_B``.

A rotated layer stores ``quantize(W · H)``; its decoded weight is ``dequant(weight) · H`` and it computes
``x @ decoded.T = rotate(x) @ dequant(weight).T``: the layer rotates its activations at run time. The
rotation spreads an outlier column's energy over its block, so block scales waste less range on it.
Default block: the largest power of two <= 256 that divides ``N``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

MAX_BLOCK = 256
KIND = "hadamard"


def default_block(n: int) -> int:
    b = 1
    while b * 2 <= MAX_BLOCK and n % (b * 2) == 0:
        b *= 2
    return b


@lru_cache(maxsize=32)
def _hadamard_cpu(b: int) -> torch.Tensor:
    h = torch.ones((1, 1), dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(b)).to(torch.float32)


def hadamard(b: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix ``[b, b]`` (``b`` a power of two)."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"Hadamard block must be a power of two, got {b}")
    return _hadamard_cpu(b).to(device=device, dtype=dtype)


def rotate(x: torch.Tensor, block: int, h: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with each block of ``block`` elements of its last dim multiplied by ``H_block`` (a new tensor).
    ``h``: a cached ``hadamard(block)`` on ``x``'s device/dtype."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"rotation block {block} does not divide the input dimension {n}")
    if h is None:
        h = hadamard(block, x.device, x.dtype)
    return torch.matmul(x.reshape(*x.shape[:-1], n // block, block), h).reshape(x.shape)


def rotate_gram(xtx: torch.Tensor, block: int) -> torch.Tensor:
    """The input Gram matrix of the rotated inputs: ``Hᵀ XᵀX H`` (blockwise; H symmetric)."""
    return rotate(rotate(xtx, block).transpose(0, 1).contiguous(), block).transpose(0, 1).contiguous()


def rotate_sqmean(sqmean: torch.Tensor, block: int) -> torch.Tensor:
    """The diagonal of ``H diag(s) H``: every entry of a block becomes the block's mean (``H_ij² = 1/B``)."""
    s = sqmean.to(torch.float32).reshape(-1, block)
    return s.mean(dim=1, keepdim=True).expand_as(s).reshape(-1).contiguous()


def parse(spec: str | None) -> dict | None:
    """``"hadamard"`` / ``"hadamard:B"`` -> ``{"kind": "hadamard", "block": B or None}``; ``None``/"" -> None.
    ``block`` None means "the default for each layer" (``default_block``)."""
    if spec is None or str(spec).strip().lower() in ("", "none", "off"):
        return None
    kind, _, b = str(spec).strip().lower().partition(":")
    if kind != KIND:
        raise ValueError(f"unknown rotation {spec!r}; use 'hadamard' or 'hadamard:B' (B a power of two <= {MAX_BLOCK})")
    if not b:
        return {"kind": KIND, "block": None}
    try:
        block = int(b)
    except ValueError:
        raise ValueError(f"rotation block {b!r} is not an integer") from None
    if block < 2 or block & (block - 1) or block > 4096:
        raise ValueError(f"rotation block must be a power of two between 2 and 4096, got {block}")
    return {"kind": KIND, "block": block}


def check(rot, n: int, where: str) -> dict:
    """Validate a ``.comfy_quant`` ``rotation`` entry for a layer with ``n`` inputs; returns it."""
    if not isinstance(rot, dict) or rot.get("kind") != KIND:
        raise ValueError(f"{where}: rotation must be {{\"kind\": \"hadamard\", \"block\": B}}, found {rot!r}")
    b = rot.get("block")
    if isinstance(b, bool) or not isinstance(b, int) or b < 1 or b & (b - 1):
        raise ValueError(f"{where}: rotation block must be a power of two, found {b!r}")
    if n % b:
        raise ValueError(f"{where}: rotation block {b} does not divide in_features {n}")
    return rot
