"""Run-time side of the converter's transforms (``converter/transforms.py``) for a HybridQuant Linear.

A layer with a rotation and/or a low-rank branch computes
``q_linear(rotate(x)) + (x @ svd_down.T) @ svd_up.T``, which equals ``x @ decoded.T`` with
``decoded = dequant(weight) · H + svd_up @ svd_down``. The quantized matmul (``inner``: whatever fast
or dequantize path ``linear_paths`` picks) sees the rotated input and the stored weight only
(``layer.hq_core_only`` makes ``hq_dequantize`` return ``dequant(weight)``); the branch is one small
GEMM plus one ``addmm`` that adds its result into the output in place. With patches (LoRA, low-VRAM
functions) the layer runs on its full decoded weight instead: patches are defined on that weight.
"""

from __future__ import annotations

import torch

from ..converter import rotation
from ..converter import transforms as tfm

_H: dict = {}


def _hadamard(block: int, device, dtype) -> torch.Tensor:
    key = (block, str(device), dtype)
    h = _H.get(key)
    if h is None:
        h = _H[key] = rotation.hadamard(block, device, dtype)
    return h


def rotate_input(x: torch.Tensor, block: int) -> torch.Tensor:
    return rotation.rotate(x, block, _hadamard(block, x.device, x.dtype))


def run(layer, x: torch.Tensor, tensors: dict, bias, fns, inner) -> torch.Tensor:
    t = layer.hq_transforms
    if fns:
        return inner(layer, x, tensors, bias, fns)  # full decoded weight (hq_dequantize), then patches
    b = tfm.block_of(t)
    xin = rotate_input(x, b) if b else x
    layer.hq_core_only = True
    try:
        out = inner(layer, xin, tensors, bias, fns)
    finally:
        layer.hq_core_only = False
    if t.get("svd_rank"):
        out = add_low_rank(out, x, tensors["svd_down"].to(x.dtype), tensors["svd_up"].to(x.dtype))
    return out


def add_low_rank(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``out + (x @ down.T) @ up.T`` (down [r, K], up [N, r], x's dtype), added in place into ``out``, the
    layer's fresh output: one small GEMM and one ``addmm_``."""
    if not out.is_contiguous():
        out = out.contiguous()
    out.reshape(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ down.T, up.T)
    return out


def decode(layer, w_core: torch.Tensor, tensors: dict) -> torch.Tensor:
    """The full decoded weight from ``dequant(weight)`` (float32)."""
    t = layer.hq_transforms
    b = tfm.block_of(t)
    w = rotation.rotate(w_core, b) if b else w_core
    if t.get("svd_rank"):
        w = w + tensors["svd_up"].to(w.device, torch.float32) @ tensors["svd_down"].to(w.device, torch.float32)
    return w
