"""ComfyUI nodes of HybridQuant (V3 schema) and the extension object ``comfy_entrypoint`` returns.

Nodes (category "HybridQuant"): Quantize Model, Load Diffusion Model / Load Checkpoint / Load CLIP
(HybridQuant), Quantization Info, plus the calibration nodes of ``nodes/calibration.py`` when that
module exists. Routes for the web extension are registered when ComfyUI loads the extension
(``on_load`` in current ComfyUI; 0.3.75 never calls ``on_load``, so ``get_node_list`` does it too).
"""

from __future__ import annotations

import importlib
import logging

from ._api import ComfyExtension, io

log = logging.getLogger("HybridQuant")


def node_list() -> list[type[io.ComfyNode]]:
    from .loaders import LoadCheckpointHQ, LoadCLIPHQ, LoadDiffusionModelHQ, QuantizationInfo
    from .quantize import QuantizeModel

    nodes = [QuantizeModel, LoadDiffusionModelHQ, LoadCheckpointHQ, LoadCLIPHQ, QuantizationInfo]
    try:
        calibration = importlib.import_module(".calibration", __name__)
    except ModuleNotFoundError as e:
        # Only "the module does not exist" is optional; an import error inside it must surface.
        if e.name != f"{__name__}.calibration":
            raise
    else:
        nodes += list(getattr(calibration, "NODES", []))
    return nodes


class HybridQuantExtension(ComfyExtension):
    async def on_load(self) -> None:
        from .routes import register_routes

        register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .routes import register_routes

        register_routes()
        return node_list()


__all__ = ["HybridQuantExtension", "node_list"]
