"""What the web summary says about this machine's matmul paths, taken from ``ops.capabilities``.

``ops/capabilities.py`` (ops-runtime) is the one place that decides which matmul path a format gets
on this device (DESIGN.md §4); this module only reshapes its answer to JSON for the routes. If that
module is missing or raises, the answer says so instead of guessing.
"""

from __future__ import annotations

import logging

log = logging.getLogger("HybridQuant")


def _caps():
    from ..ops import capabilities

    return capabilities


def device_report() -> dict:
    try:
        caps = _caps()
        return {"available": True, **caps.describe()}
    except Exception as e:  # noqa: BLE001 - the web page shows the reason instead of a guess
        return {"available": False, "reason": f"ops.capabilities unavailable: {type(e).__name__}: {e}"}


def fast_path_for_formats(formats: dict) -> dict:
    """Per format present in a file: {"path": name of the matmul path, "fast": bool}."""
    try:
        caps = _caps()
        out = {}
        for fmt in formats:
            out[fmt] = caps.path_for_format(fmt)
        return {"available": True, "device": caps.describe().get("device"), "formats": out,
                "any_fast": any(v.get("fast") for v in out.values())}
    except Exception as e:  # noqa: BLE001
        return {"available": False, "reason": f"ops.capabilities unavailable: {type(e).__name__}: {e}"}
