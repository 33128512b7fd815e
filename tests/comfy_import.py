"""Importing a real ComfyUI tree in-process, for the tests (``conftest.py``) and the fuzzer
(``fuzz_helpers.py``), which runs as a plain script without pytest.

Which tree: ``HYBRIDQUANT_COMFYUI`` or the 0.3.75 tree ``scripts/install_comfyui.sh`` puts in
``.comfyui/ComfyUI``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = REPO / ".comfyui" / "ComfyUI"


def comfyui_root() -> Path:
    return Path(os.environ.get("HYBRIDQUANT_COMFYUI", DEFAULT_COMFYUI)).resolve()


def import_comfy(root: Path, modules=("comfy.model_management",)):
    """Put ``root`` on ``sys.path`` and import ``modules`` on the CPU; returns the ``comfy`` package.

    ComfyUI parses its command line when ``comfy.model_management`` is imported: the caller's argv
    (pytest's, the fuzzer's) is swapped for ``--cpu`` meanwhile, so it neither fails on unknown
    flags nor picks a GPU."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    saved = sys.argv
    sys.argv = [saved[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        for name in modules:
            importlib.import_module(name)
    finally:
        sys.argv = saved
    import comfy as comfy_pkg

    return comfy_pkg
