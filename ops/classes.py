"""The HybridQuant ops class and ``choose_ops`` (imports ComfyUI; see ``ops/__init__.py`` for the API).

One class: every quantized layout loads and runs through the same ``Linear`` (the format of each layer
comes from the file, the matmul path from the device). ``HybridBNB4bitOps`` and ``HybridMXFP8Ops`` are
the names files, workflows and users already refer to; both are this class.
"""

from __future__ import annotations

import comfy.ops

from .direct import make_direct
from .layers import make_linear

# Every manual_cast layer class this core has, but Embedding (its input is indices: never direct).
_DIRECT = [n for n in ("Conv1d", "Conv2d", "Conv3d", "BatchNorm2d", "GroupNorm", "LayerNorm", "RMSNorm",
                       "ConvTranspose1d", "ConvTranspose2d")
           if hasattr(comfy.ops.manual_cast, n) and hasattr(comfy.ops.disable_weight_init, n)]


class HybridQuantOps(comfy.ops.manual_cast):
    """ComfyUI ops for every HybridQuant layout (FP8, INT8, MXFP8, Hybrid MXFP8, NVFP4, bitsandbytes 4-bit,
    legacy scaled FP8, header-only and mixed files); plain layers behave exactly as stock ComfyUI
    (``manual_cast``, with the direct call of ``ops/direct.py`` when nothing needs casting)."""

    hybridquant = True

    Linear = make_linear(make_direct(comfy.ops.manual_cast.Linear, comfy.ops.disable_weight_init.Linear))


for _name in _DIRECT:
    setattr(HybridQuantOps, _name, make_direct(getattr(comfy.ops.manual_cast, _name),
                                               getattr(comfy.ops.disable_weight_init, _name)))


HybridBNB4bitOps = HybridQuantOps
HybridMXFP8Ops = HybridQuantOps

OPS_CLASSES = {"HybridQuantOps": HybridQuantOps, "HybridBNB4bitOps": HybridQuantOps, "HybridMXFP8Ops": HybridQuantOps}


def choose_ops(keys=None, header_metadata=None, override=None):
    """The ops class for a file. There is one; ``override`` (a name in ``OPS_CLASSES`` or the class)
    is still checked so that a misspelt name in an old workflow is an error, not a silent default."""
    if override is not None and not (isinstance(override, type) and override is HybridQuantOps):
        if override not in OPS_CLASSES:
            raise ValueError(f"unknown HybridQuant ops {override!r}; choose one of {', '.join(OPS_CLASSES)}")
    return HybridQuantOps
