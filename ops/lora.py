"""LoRA on 4-bit layers, computed on the fly: a ModelPatcher subclass, adopted by our loaders.

ComfyUI merges a LoRA into a fully loaded layer with ``patch_weight_to_device``: dequantize
(``convert_weight``), add the patch, store (``set_weight``). For FP8/INT8/MX layers that is what we do
(requantized with the stored scales, so the patcher's backup of ``weight`` restores it bit for bit).
For 4-bit layers (bitsandbytes NF4/FP4, NVFP4) merging would rewrite the packed codes with a lossy
requantization, and keeping a float copy would cost the memory 4-bit exists to save. So
``HybridModelPatcher.patch_weight_to_device`` does not merge a 4-bit layer's patch: it gives the layer
an on-the-fly function (``OnTheFlyPatch``: ``comfy.lora.calculate_weight`` over the patch list, the
same thing ComfyUI's low-VRAM patch does) which the layer applies to its dequantized weight per call.
``unpatch_model`` drops those functions; the packed data was never touched.

``adopt_patcher(mp)`` switches a ModelPatcher (e.g. the one ``comfy.sd.load_diffusion_model_state_dict``
returns) to this subclass in place; ``clone()`` keeps the class (it uses ``self.__class__`` in 0.3.75
and 0.29), so LoRA loaders' clones stay adopted.
"""

from __future__ import annotations

import comfy.lora
import comfy.model_patcher
import comfy.utils

from . import capabilities as caps
from . import dispatch, dynamic_vram


class OnTheFlyPatch:
    """Applies ``patches[key]`` to a float weight; ``key`` lets ComfyUI's own low-VRAM patch take over."""

    def __init__(self, key, patches):
        self.key = key
        self.patches = patches

    def __call__(self, weight):
        return comfy.lora.calculate_weight(self.patches[self.key], weight, self.key, intermediate_dtype=weight.dtype)


def _owner(model, key):
    """The 4-bit HybridQuant layer that owns ``key``, or None."""
    m = dynamic_vram.quantized_owner(model, key)
    return m if m is not None and dispatch.is_four_bit(m.hq_format) else None


_classes: dict[type, type] = {}


def patcher_class(base: type) -> type:
    cls = _classes.get(base)
    if cls is not None:
        return cls

    class HybridModelPatcher(base):
        def patch_weight_to_device(self, key, device_to=None, inplace_update=False, **kwargs):
            if kwargs.get("force_cast") and not kwargs.get("return_weight", False):
                # Dynamic VRAM's force load (ops/dynamic_vram.py): stored weights move as they are.
                q = dynamic_vram.quantized_owner(self.model, key)
                if q is not None and (key not in self.patches or dispatch.is_four_bit(q.hq_format)):
                    dynamic_vram.force_load(self, key, device_to)
                    if key not in self.patches:
                        return None
            m = _owner(self.model, key)
            if m is not None and key in self.patches and not kwargs.get("return_weight", False):
                m.hq_lora = OnTheFlyPatch(key, self.patches)
                return None
            return super().patch_weight_to_device(key, device_to, inplace_update, **kwargs)

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                for m in self.model.modules():
                    if getattr(m, "hq_lora", None) is not None:
                        m.hq_lora = None
            return super().unpatch_model(device_to, unpatch_weights)

    HybridModelPatcher.__name__ = HybridModelPatcher.__qualname__ = f"Hybrid{base.__name__}"
    _classes[base] = HybridModelPatcher
    _classes[HybridModelPatcher] = HybridModelPatcher
    return HybridModelPatcher


_CLONE_KEY = "hybridquant_adopt"


def _adopt_clone(_source, clone):
    adopt_patcher(clone)


def adopt_patcher(model_patcher):
    """Make ``model_patcher`` (and its future clones) patch 4-bit layers on the fly. Returns it."""
    if model_patcher is None:
        return None
    if not isinstance(model_patcher, comfy.model_patcher.ModelPatcher):
        raise TypeError(f"adopt_patcher: expected a ModelPatcher, got {type(model_patcher).__name__}")
    model_patcher.__class__ = patcher_class(type(model_patcher))
    if caps.core_dynamic_vram():
        # Dynamic cores build a non-dynamic clone as a plain ModelPatcher (clone(disable_dynamic=True):
        # hooks, TorchCompileModel): adopt it too. Callbacks are copied to every clone.
        from comfy.patcher_extension import CallbacksMP

        if not model_patcher.get_callbacks(CallbacksMP.ON_CLONE, _CLONE_KEY):
            model_patcher.add_callback_with_key(CallbacksMP.ON_CLONE, _CLONE_KEY, _adopt_clone)
    return model_patcher
