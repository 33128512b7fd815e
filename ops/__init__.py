"""HybridQuant runtime for ComfyUI: custom operations classes that load quantized layers per layer.

Public API
----------
``HybridQuantOps`` (also exported as ``HybridBNB4bitOps`` and ``HybridMXFP8Ops``, the names files and
    workflows use: the same class)
    A ComfyUI operations namespace (subclass of ``comfy.ops.manual_cast``). Every non-quantized layer
    is stock ComfyUI. Its ``Linear`` loads, per layer, every format of the registry
    (``converter/formats/registry.py``), legacy scaled-FP8, header-only files and plain layers; mixed
    files load with every layer correct. The matmul kernel per layer and device comes from
    ``ops.dispatch`` (the format's ``spec.kernels`` against ``capabilities.features(device)``).
``choose_ops(keys, header_metadata, override=None) -> ops class``
    ``HybridQuantOps``; an ``override`` name is checked against ``OPS_CLASSES``.
``prepare_state_dict(sd, header_metadata) -> sd`` (``ops.state_dict``; ComfyUI-free)
    A new dict ready for ComfyUI's stock loaders: logical-shape ``.weight`` placeholders for quantized
    layers (packed data under ``.weight_qdata``), ``.comfy_quant`` for header-only and legacy layers.
``adopt_patcher(model_patcher) -> model_patcher`` (``ops.lora``)
    Makes the ModelPatcher (and its clones) apply LoRAs to 4-bit layers on the fly instead of
    requantizing the packed codes. Call it on every ModelPatcher our loaders return.
``capabilities`` -- ``path_for(device)``, ``device_capability``, ``bnb_cuda_available`` (all device checks).

How a loader uses them (ComfyUI 0.3.75, 0.29, 0.33)
--------------------------------------------------------
::

    import inspect, safetensors
    from hybridquant import ops                       # inside the pack: from .. import ops
    sd, meta = <load tensors>, <safetensors __metadata__ or {}>
    ops_class = ops.choose_ops(sd.keys(), meta)
    sd = ops.prepare_state_dict(sd, meta)
    fn = comfy.sd.load_diffusion_model_state_dict
    kw = {"model_options": {"custom_operations": ops_class}}
    if "disable_dynamic" in inspect.signature(fn).parameters and not ops.capabilities.core_dynamic_vram():
        kw["disable_dynamic"] = True   # a dynamic-VRAM core whose protocol ops/dynamic_vram.py does not know
    model = ops.adopt_patcher(fn(sd, **kw))

Checkpoints: ``comfy.sd.load_state_dict_guess_config(sd, output_vae=True, output_clip=True,
model_options={"custom_operations": ops_class}, te_model_options={"custom_operations": ops_class})``
(+ the same ``disable_dynamic`` rule), then ``adopt_patcher(model)`` and
``adopt_patcher(clip.patcher)``. Text encoders: ``comfy.sd.load_text_encoder_state_dicts([sd, ...],
clip_type=..., model_options={"custom_operations": ops_class})``, then ``adopt_patcher(clip.patcher)``.
Passing ``custom_operations`` makes ComfyUI use the class verbatim and skip its own header ->
``.comfy_quant`` handling and ``pick_operations``; ``prepare_state_dict`` does that conversion instead.
Do not pass ComfyUI's own ``fp8_optimizations``. Our ops never use either generation's
``QuantizedTensor`` or comfy-kitchen.
"""

from __future__ import annotations

from . import capabilities
from .state_dict import prepare_state_dict

_LAZY = {"HybridQuantOps": "classes", "HybridBNB4bitOps": "classes", "HybridMXFP8Ops": "classes", "OPS_CLASSES": "classes",
         "choose_ops": "classes", "adopt_patcher": "lora"}


def __getattr__(name):
    # The ops classes import ComfyUI; ``capabilities`` and ``prepare_state_dict`` must not need it
    # (the pack's root and its info routes import them outside a running ComfyUI too).
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


__all__ = ["HybridQuantOps", "HybridBNB4bitOps", "HybridMXFP8Ops", "choose_ops", "prepare_state_dict", "adopt_patcher",
           "capabilities", "OPS_CLASSES"]
