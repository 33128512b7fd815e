"""The one registry of formats: codec modules in display order, and the lookups derived from their specs.

Adding a format = one module under ``converter/formats/`` whose codec class carries a ``spec``
(``spec.py``) + one line in ``_ENTRIES`` below. Everything else (CLI modes, Quantize Model options,
padding/orig_shape rules, logical-shape recovery, ops kernel choice, file info, web labels/colours)
reads these functions. Tests register throwaway formats with ``register``/``unregister``.

Codec modules import only torch, so importing them all on first use costs nothing that matters; the
import is still deferred to the first lookup to keep ``import hybridquant.converter.formats`` cheap.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator

from .base import Codec, FormatError
from .spec import FormatSpec, Variant

# (module, codec class). Order = display order (node options, legends, --help).
_ENTRIES: list[tuple[str, str]] = [
    ("fp8", "FP8Tensorwise"),
    ("fp8", "FP8Rowwise"),
    ("fp8", "FP8Blockwise"),
    ("fp8", "FP8E5M2Tensorwise"),
    ("int8", "Int8Tensorwise"),
    ("int8", "Int8Blockwise"),
    ("mxfp8", "MXFP8"),
    ("hybrid_mxfp8", "HybridMXFP8"),
    ("int6", "Int6Groupwise"),
    ("int5", "Int5Groupwise"),
    ("nvfp4", "NVFP4"),
    ("convrot_w4a4", "ConvRotW4A4"),
    ("asym_w4a8_int8", "AsymW4A8Int8"),
    ("bnb4bit", "BnbNF4"),
    ("bnb4bit", "BnbFP4"),
]

_lock = threading.Lock()
_codecs: dict[str, Codec] | None = None


def _load() -> dict[str, Codec]:
    global _codecs
    if _codecs is None:
        with _lock:
            if _codecs is None:
                out: dict[str, Codec] = {}
                for module, cls in _ENTRIES:
                    codec = getattr(importlib.import_module(f"{__package__}.{module}"), cls)()
                    out[codec.spec.name] = codec
                _codecs = out
    return _codecs


def register(codec: Codec) -> None:
    """Add a codec instance at run time (tests; plug-ins). Its ``spec.name`` must be new."""
    codecs = _load()
    name = codec.spec.name
    if name in codecs:
        raise FormatError(f"format {name!r} is already registered")
    codecs[name] = codec


def unregister(name: str) -> None:
    _load().pop(name, None)


def format_names() -> tuple[str, ...]:
    return tuple(_load())


def get_codec(name: str) -> Codec:
    """The codec for a format name; FormatError listing the known names otherwise."""
    codec = _load().get(name) if isinstance(name, str) else None
    if codec is None:
        raise FormatError(f"unknown quantization format {name!r}; known formats: {', '.join(format_names())}")
    return codec


def get_spec(name: str) -> FormatSpec:
    return get_codec(name).spec


def find_spec(name) -> FormatSpec | None:
    """The spec of a known format name, None for anything else (no exception)."""
    codec = _load().get(name) if isinstance(name, str) else None
    return codec.spec if codec is not None else None


def specs() -> Iterator[FormatSpec]:
    return (c.spec for c in _load().values())


def families() -> tuple[str, ...]:
    """The CLI primary modes, in registry order."""
    out: list[str] = []
    for s in specs():
        if s.family not in out:
            out.append(s.family)
    return tuple(out)


def family_specs(family: str) -> list[FormatSpec]:
    return [s for s in specs() if s.family == family]


def select(family: str, key: str | None) -> tuple[FormatSpec, Variant] | None:
    """The (spec, variant) a user's (family, variant key) selects; the family's first variant for
    ``key=None`` or for a family with a single, key-less choice. None when nothing matches."""
    members = family_specs(family)
    for s in members:
        for v in s.variants:
            if key is None or v.key == key or v.key == "":
                return s, v
    return None


def choices(custom_only: bool = False) -> list[tuple[FormatSpec, Variant]]:
    """Every user-facing choice (spec, variant), in display order."""
    return [(s, v) for s in specs() if (s.custom or not custom_only) for v in s.variants]


def bits_per_weight(name: str, shape: tuple[int, int] | None = None, **opts) -> float:
    """Stored bits per logical weight (codes + scales), from the codec's own output specs."""
    codec = get_codec(name)
    shape = shape or codec.spec.bits_shape
    nbytes = sum(t.nbytes for t in codec.output_specs(shape, **opts).values())
    return 8.0 * nbytes / (shape[0] * shape[1])


def name_words() -> list[str]:
    """The words the pack's node names carry for name-only node search (``FormatSpec.name_word``), in
    display order, without a word that another one contains ("fp8" is found through "mxfp8"): the name
    stays short, which the fuzzy search of those frontends rewards."""
    words = list(dict.fromkeys(w for w in (s.search_name_word() for s in specs()) if w))
    return [w for w in words if not any(o != w and w in o for o in words)]


def four_bit_names() -> frozenset[str]:
    return frozenset(s.name for s in specs() if s.four_bit)


def with_kernel(kernel: str) -> frozenset[str]:
    """Names of the formats that list ``kernel`` for some device path."""
    return frozenset(s.name for s in specs() if kernel in s.kernels.values())
