"""Shared fixtures.

ComfyUI: the integration tests import a real ComfyUI. By default that is the 0.3.75 tree that
``scripts/install_comfyui.sh`` puts in ``.comfyui/ComfyUI``; set ``HYBRIDQUANT_COMFYUI=/path/to/tree``
to run them against another one (e.g. current ComfyUI 0.33.0, with the venv
``scripts/install_current_comfyui.sh`` makes for it). A missing tree is an error, not a skip,
unless ``HYBRIDQUANT_ALLOW_NO_COMFYUI=1`` (CI installs it, so those tests always run there).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from comfy_import import comfyui_root, import_comfy


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
    return import_comfy(comfyui_path, ("comfy.model_management", "comfy.model_patcher", "comfy.ops"))


@pytest.fixture
def ops(comfy):
    """``hybridquant.ops`` inside the real ComfyUI, with no device-capability override left over from
    another test (tests mock capabilities to reach every matmul path)."""
    import hybridquant.ops as ops
    from hybridquant.ops import capabilities

    capabilities.clear_overrides()
    yield ops
    capabilities.clear_overrides()
