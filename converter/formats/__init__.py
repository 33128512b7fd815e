"""Format codecs: one module per on-disk layout, pure torch, no ComfyUI. See ``base.py`` for the
codec contract, ``spec.py`` for the traits each format declares and ``registry.py`` for the list of
formats and every lookup derived from it.
"""

from __future__ import annotations

from .base import Codec, FormatError, NonFiniteError, TensorSpec
from .registry import find_spec, format_names, get_codec, get_spec
from .spec import FormatSpec, Variant


def __getattr__(name):
    # FORMAT_NAMES follows the registry (a format registered at run time is part of it).
    if name == "FORMAT_NAMES":
        return format_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Codec", "FormatError", "NonFiniteError", "TensorSpec", "FormatSpec", "Variant", "get_codec",
           "get_spec", "find_spec", "format_names"]
