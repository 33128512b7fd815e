"""The ComfyUI V3 node API, imported the same way on ComfyUI 0.3.75 and current ComfyUI (0.29).

Both generations ship ``comfy_api.latest`` exporting ``ComfyExtension`` and ``io`` (``io.ComfyNode``,
``io.Schema``, ``io.Combo``...). ComfyUI's loader checks ``isinstance(ext, ComfyExtension)`` against
``comfy_api.latest.ComfyExtension``, so we must subclass that very class, not a versioned copy.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io  # noqa: F401  (present in 0.3.75 and 0.29)

__all__ = ["ComfyExtension", "io"]
