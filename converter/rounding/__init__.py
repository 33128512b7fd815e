"""How weights are rounded onto a format's grid.

``quantize_weight`` is the single entry point the converter (CLI and ComfyUI node) calls for every
layer. Methods:
- ``"rtn"``: round to nearest with the format's own scale choice (``--simple``).
Further methods (data-free error-aware scales, calibrated GPTQ) are added in this package.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..formats.base import Codec

METHODS = ("rtn",)


def quantize_weight(codec: Codec, weight: torch.Tensor, method: str = "rtn", stats: Mapping[str, torch.Tensor] | None = None, **opts) -> dict[str, torch.Tensor]:
    """Quantize one 2-D weight with ``codec``; returns the tensors to store (suffix -> tensor)."""
    if method == "rtn":
        return codec.quantize(weight, **opts)
    raise ValueError(f"unknown rounding method {method!r}; known: {', '.join(METHODS)}")
