"""The ComfyUI V3 node API, imported the same way on ComfyUI 0.3.75 and current ComfyUI (0.29).

Both generations ship ``comfy_api.latest`` exporting ``ComfyExtension`` and ``io`` (``io.ComfyNode``,
``io.Schema``, ``io.Combo``...). ComfyUI's loader checks ``isinstance(ext, ComfyExtension)`` against
``comfy_api.latest.ComfyExtension``, so we must subclass that very class, not a versioned copy.
"""

from __future__ import annotations

import dataclasses

from comfy_api.latest import ComfyExtension, io  # noqa: F401  (present in 0.3.75 and 0.29)

SUFFIX = " (HybridQuant)"


class Combo(io.Combo.Input):
    """``io.Combo.Input`` whose type is its list of options, as V1 nodes declare combos.

    ComfyUI 0.3.75 checks a combo's value only when the input's type IS the list
    (``isinstance(input_type, list)`` in ``execution.validate_inputs``); a V3 combo's type is the string
    "COMBO", so a bad value (a stale file name, a misspelt rounding in an API prompt) would pass
    validation and fail late. With the list as the type, ComfyUI's own check runs and attributes a
    "Value not in list" error to that input alone, before anything loads.

    Current cores (0.33) check a V3 "COMBO" against its options themselves, and their V3 input parser
    looks each input's type up in a dict (``_io.parse_class_inputs``): a list type there fails every
    prompt with "unhashable type: 'list'". On those cores the type stays "COMBO"."""

    def get_io_type(self):
        return super().get_io_type() if core_checks_v3_combos() else list(self.options)


def core_checks_v3_combos() -> bool:
    """Whether this core parses V3 inputs by type name and validates V3 combos (ComfyUI 0.33's
    ``comfy_api.latest._io.get_finalized_class_inputs``; 0.3.75 has neither)."""
    try:
        from comfy_api.latest import _io
    except ImportError:  # pragma: no cover - every supported core has it
        return False
    return hasattr(_io, "get_finalized_class_inputs")


def schema_supports(field: str) -> bool:
    """Whether this core's ``io.Schema`` has ``field`` (0.3.75 has no ``search_aliases``)."""
    return field in {f.name for f in dataclasses.fields(io.Schema)}


def schema(*, search_aliases=(), **kw) -> io.Schema:
    """``io.Schema`` with the fields this core knows: search words go to ``search_aliases`` where the
    core has it; the web extension adds them to the search of frontends that lack it."""
    if search_aliases and schema_supports("search_aliases"):
        kw["search_aliases"] = sorted(set(search_aliases))
    return io.Schema(**kw)


def format_aliases() -> list[str]:
    """Every search word of every format in the registry (``fp8``, ``nf4``, ``int8`` ...)."""
    from ..converter.formats import registry

    words: list[str] = []
    for spec in registry.specs():
        for w in (spec.name, spec.label, *spec.aliases):
            if w.lower() not in words:
                words.append(w.lower())
    return words


__all__ = ["ComfyExtension", "io", "Combo", "core_checks_v3_combos", "schema", "schema_supports", "format_aliases", "SUFFIX"]
