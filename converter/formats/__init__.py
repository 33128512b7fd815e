"""Format codecs: one module per on-disk layout, pure torch, no ComfyUI. See ``base.py`` for the contract.

``get_codec(name)`` maps a ``.comfy_quant`` format name (or one of the bitsandbytes names
``bnb_nf4``/``bnb_fp4``) to its codec. Modules register themselves in ``_REGISTRY`` below; the import
is lazy so importing the package stays cheap.
"""

from __future__ import annotations

import importlib

from .base import Codec, FormatError, NonFiniteError, TensorSpec

# format name -> (module, class name). One module per layout.
_REGISTRY: dict[str, tuple[str, str]] = {
    "float8_e4m3fn": ("fp8", "FP8Tensorwise"),
    "float8_e5m2": ("fp8", "FP8E5M2Tensorwise"),
    "float8_e4m3fn_rowwise": ("fp8", "FP8Rowwise"),
    "float8_e4m3fn_blockwise": ("fp8", "FP8Blockwise"),
    "int8_tensorwise": ("int8", "Int8Tensorwise"),
    "int8_blockwise": ("int8", "Int8Blockwise"),
    "mxfp8": ("mxfp8", "MXFP8"),
    "hybrid_mxfp8": ("hybrid_mxfp8", "HybridMXFP8"),
    "nvfp4": ("nvfp4", "NVFP4"),
    "bnb_nf4": ("bnb4bit", "BnbNF4"),
    "bnb_fp4": ("bnb4bit", "BnbFP4"),
}

FORMAT_NAMES = tuple(_REGISTRY)
_cache: dict[str, Codec] = {}


def get_codec(name: str) -> Codec:
    """Return the codec for a format name; FormatError listing the known names otherwise."""
    codec = _cache.get(name)
    if codec is not None:
        return codec
    if name not in _REGISTRY:
        raise FormatError(f"unknown quantization format {name!r}; known formats: {', '.join(FORMAT_NAMES)}")
    module, cls = _REGISTRY[name]
    codec = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    _cache[name] = codec
    return codec


__all__ = ["Codec", "FormatError", "NonFiniteError", "TensorSpec", "get_codec", "FORMAT_NAMES"]
