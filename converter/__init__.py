"""The converter library: quantizes ``.safetensors`` checkpoints layer by layer. Never imports ComfyUI.

Public API (what ``nodes/`` and ``ops/`` use; ARCHITECTURE.md shows the data flow)
-----------------------------------------------------------------------------------
``PlanOptions``, ``Planner``, ``plan_file(path, options)``, ``plan_state_dict(sd, options)``
    The per-layer decisions of a conversion (format, options, the reason a layer is kept).
``convert_file(input, output, options, ...)``, ``quantize_state_dict(sd, options, ...)``  (``convert.py``)
    Stream a file to a new quantized file (atomic), or quantize an in-memory state dict.
``inspect_file(path) -> FileInfo``  (``inspect.py``)
    Every layer of a file (format, logical shape, bytes, options) from its header and metadata
    tensors only; cached by path, size and mtime.
``discover_layers(keys, header_metadata, get_tensor)``, ``LayerInfo``  (``metadata.py``)
    The quantized layers of a state dict or file: the one discovery every reader uses.
``formats``: the registry (``get_codec``, ``get_spec``, ``format_names``, ``registry.choices`` ...).

Names are resolved lazily, so ``import hybridquant.converter`` stays cheap (no torch import).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "PlanOptions": "plan", "Planner": "plan", "LayerPlan": "plan", "resolve_format": "plan",
    "convert_file": "convert", "quantize_state_dict": "convert", "plan_file": "convert",
    "plan_state_dict": "convert",
    "inspect_file": "inspect", "FileInfo": "inspect", "LayerSummary": "inspect",
    "discover_layers": "metadata", "LayerInfo": "metadata",
}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


__all__ = sorted(_LAZY)
