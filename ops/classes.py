"""The two ops classes and ``choose_ops`` (imports ComfyUI; see ``ops/__init__.py`` for the API)."""

from __future__ import annotations

import comfy.ops

from .layers import make_linear


class HybridMXFP8Ops(comfy.ops.manual_cast):
    """ComfyUI ops for .comfy_quant files (FP8, INT8, MXFP8, Hybrid MXFP8, NVFP4; BNB layers too)."""

    hybridquant = True

    Linear = make_linear(comfy.ops.manual_cast.Linear)


class HybridBNB4bitOps(comfy.ops.manual_cast):
    """ComfyUI ops for bitsandbytes 4-bit files, incl. mixed BNB + FP8/INT8 (every format loads)."""

    hybridquant = True

    Linear = make_linear(comfy.ops.manual_cast.Linear)


OPS_CLASSES = {"HybridBNB4bitOps": HybridBNB4bitOps, "HybridMXFP8Ops": HybridMXFP8Ops}


def choose_ops(keys, header_metadata=None, override=None):
    """The ops class for a file's keys (its ``__metadata__`` is accepted for future rules)."""
    if override is not None:
        if isinstance(override, type) and override in OPS_CLASSES.values():
            return override
        if override not in OPS_CLASSES:
            raise ValueError(f"unknown HybridQuant ops {override!r}; choose one of {', '.join(OPS_CLASSES)}")
        return OPS_CLASSES[override]
    if any(".weight.quant_state.bitsandbytes__" in k for k in keys):
        return HybridBNB4bitOps
    return HybridMXFP8Ops

