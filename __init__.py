"""ComfyUI-HybridQuant: quantize checkpoints to FP8 / INT8 / MXFP8 / NVFP4 / bitsandbytes 4-bit and
load them (mixed files included) in ComfyUI.

This file is both the ComfyUI custom-node entry point (the repo root is the custom-node folder) and
the root of the pip distribution ``comfyui-hybridquant`` (installed under the name ``hybridquant``).
It must stay importable without ComfyUI: nothing ComfyUI-specific is imported here at import time.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """V3 entry point: ComfyUI calls this to get our extension (nodes are imported only now)."""
    from .nodes import HybridQuantExtension

    return HybridQuantExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
