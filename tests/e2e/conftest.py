"""Fixtures of the end-to-end tests: one real ComfyUI server per session, with our synthetic models.

The server runs the ComfyUI tree of ``tests/comfy_import.py``'s ``comfyui_root()`` (0.3.75 by default,
``HYBRIDQUANT_COMFYUI=/path/to/ComfyUI`` for current ComfyUI) with the Python running pytest, on a free
port in 8302-8399 (``HYBRIDQUANT_E2E_PORT`` pins one). Its log goes to artifacts/e2e-server.log.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from .harness import REPO, ComfyServer

ARTIFACTS = REPO / "artifacts"


@pytest.fixture(scope="session")
def comfy_server(comfyui_path):
    base = Path(tempfile.mkdtemp(prefix="hq-e2e-"))
    server = ComfyServer(comfyui_path, base, python=sys.executable)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        if server.log_path.exists():
            shutil.copy(server.log_path, ARTIFACTS / "e2e-server.log")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_models(comfy, comfy_server):
    """Write the tiny SD3 MMDiT and CLIP-L into the server's model folders (once per session)."""
    from safetensors.torch import save_file

    from .synthetic import clip_l_state_dict, sd3_mmdit_state_dict

    unet = comfy_server.models("diffusion_models") / "hq_tiny_sd3.safetensors"
    save_file(sd3_mmdit_state_dict(depth=2, seed=0), str(unet))
    clip = comfy_server.models("text_encoders") / "hq_clip_l.safetensors"
    save_file(clip_l_state_dict(seed=1), str(clip))
    return {"unet": unet.name, "clip": clip.name}
