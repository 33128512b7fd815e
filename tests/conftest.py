"""Shared fixtures.

ComfyUI: the integration tests import a real ComfyUI. By default that is the 0.3.75 tree that
``scripts/install_comfyui.sh`` puts in ``.comfyui/ComfyUI``; set ``HYBRIDQUANT_COMFYUI=/path/to/tree``
to run them against another one (e.g. current ComfyUI 0.33.0, with the venv
``scripts/install_current_comfyui.sh`` makes for it). A missing tree is an error, not a skip,
unless ``HYBRIDQUANT_ALLOW_NO_COMFYUI=1`` (CI installs it, so those tests always run there).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = REPO / ".comfyui" / "ComfyUI"


def comfyui_root() -> Path:
    return Path(os.environ.get("HYBRIDQUANT_COMFYUI", DEFAULT_COMFYUI)).resolve()


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    root = comfyui_root()
    if not (root / "comfy" / "ops.py").is_file():
        if os.environ.get("HYBRIDQUANT_ALLOW_NO_COMFYUI") == "1":
            pytest.skip(f"no ComfyUI tree at {root}")
        raise RuntimeError(f"no ComfyUI tree at {root}: run scripts/install_comfyui.sh or set HYBRIDQUANT_COMFYUI")
    return root


@pytest.fixture(scope="session")
def comfy(comfyui_path):
    """Import the real ComfyUI package in-process (CPU). Returns the ``comfy`` module."""
    if str(comfyui_path) not in sys.path:
        sys.path.insert(0, str(comfyui_path))
    # ComfyUI parses its CLI args at import; keep pytest's argv away from it and force CPU.
    saved = sys.argv
    sys.argv = [saved[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses args, picks the CPU device)
        import comfy.model_patcher  # noqa: F401
        import comfy.ops  # noqa: F401
    finally:
        sys.argv = saved
    import comfy as comfy_pkg

    return comfy_pkg
