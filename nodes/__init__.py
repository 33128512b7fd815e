"""ComfyUI nodes of HybridQuant (V3 schema) and the extension object ``comfy_entrypoint`` returns.

Nodes (category "HybridQuant", every display name ends in "(HybridQuant)"): Quantize Model, Load
Diffusion Model / Load Checkpoint / Load CLIP, Quantization Info, and the calibration nodes of
``nodes/calibration.py``. Routes for the web extension are registered when ComfyUI loads the extension
(``on_load`` in current ComfyUI; 0.3.75 never calls ``on_load``, so ``get_node_list`` does it too).
The pack's bundled example model (``examples/``) is offered in the diffusion-model lists, so the
example workflows (``example_workflows/``) run on a fresh install.
"""

from __future__ import annotations

import os

from ._api import ComfyExtension, io

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def register_examples() -> None:
    """Add ``examples/`` to the diffusion_models search paths (after the user's own folders)."""
    try:
        import folder_paths
    except ImportError:
        return
    if os.path.isdir(EXAMPLES_DIR) and EXAMPLES_DIR not in folder_paths.get_folder_paths("diffusion_models"):
        folder_paths.add_model_folder_path("diffusion_models", EXAMPLES_DIR, is_default=False)


def node_list() -> list[type[io.ComfyNode]]:
    from .calibration import NODES as CALIBRATION_NODES
    from .loaders import LoadCheckpointHQ, LoadCLIPHQ, LoadDiffusionModelHQ, QuantizationInfo
    from .quantize import QuantizeModel

    return [QuantizeModel, LoadDiffusionModelHQ, LoadCheckpointHQ, LoadCLIPHQ, QuantizationInfo, *CALIBRATION_NODES]


class HybridQuantExtension(ComfyExtension):
    async def on_load(self) -> None:
        from .routes import register_routes

        register_examples()
        register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .routes import register_routes

        register_examples()
        register_routes()
        return node_list()


__all__ = ["HybridQuantExtension", "node_list", "register_examples", "EXAMPLES_DIR"]
