"""ComfyUI nodes of HybridQuant (V3 schema) and the extension object ``comfy_entrypoint`` returns.

Nodes (category "HybridQuant"): Quantize Model, Load Diffusion Model / Load Checkpoint / Load CLIP
(HybridQuant), Quantization Info, and the calibration nodes of ``nodes/calibration.py``. Routes for
the web extension are registered when ComfyUI loads the extension (``on_load`` in current ComfyUI; 0.3.75 never calls ``on_load``, so ``get_node_list`` does it too).
"""

from __future__ import annotations

from ._api import ComfyExtension, io


def node_list() -> list[type[io.ComfyNode]]:
    from .calibration import NODES as CALIBRATION_NODES
    from .loaders import LoadCheckpointHQ, LoadCLIPHQ, LoadDiffusionModelHQ, QuantizationInfo
    from .quantize import QuantizeModel

    return [QuantizeModel, LoadDiffusionModelHQ, LoadCheckpointHQ, LoadCLIPHQ, QuantizationInfo, *CALIBRATION_NODES]


class HybridQuantExtension(ComfyExtension):
    async def on_load(self) -> None:
        from .routes import register_routes

        register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .routes import register_routes

        register_routes()
        return node_list()


__all__ = ["HybridQuantExtension", "node_list"]
