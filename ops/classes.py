"""The HybridQuant ops class and ``choose_ops`` (imports ComfyUI; see ``ops/__init__.py`` for the API).

One class: every quantized layout loads and runs through the same ``Linear`` (the format of each layer
comes from the file, the matmul path from the device). ``HybridBNB4bitOps`` and ``HybridMXFP8Ops`` are
the names files, workflows and users already refer to; both are this class.
"""

from __future__ import annotations

import comfy.ops

from .layers import make_linear


class HybridQuantOps(comfy.ops.manual_cast):
    """ComfyUI ops for every HybridQuant layout (FP8, INT8, MXFP8, Hybrid MXFP8, NVFP4, bitsandbytes 4-bit,
    legacy scaled FP8, header-only and mixed files); plain layers behave exactly as stock ComfyUI."""

    hybridquant = True

    Linear = make_linear(comfy.ops.manual_cast.Linear)


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
