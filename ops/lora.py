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

Plain LoRA patches (``OnTheFlyPatch.low_rank``) skip the dequantized weight altogether: the layer runs
its own 4-bit path and adds ``(x @ down.T) @ (s * up).T``, two small GEMMs. Why: dequantizing the whole
weight, building ``up @ down`` and adding it per call made a rank-64 LoRA on every Flux attention
projection cost +90% of an NF4 step on the H200, with the factors copied from the CPU on every call
(ComfyUI's ``calculate_weight`` casts them per call: a host->device copy that also breaks CUDA-graph
capture) (bench/RESULTS_H200.md, LoRA rows). Anything else in the list (other adapter types, DoRA,
``strength_model``, offsets, functions) keeps ``calculate_weight`` on the dequantized weight.
Memory: the concatenated factors stay on the layer's GPU in the activation dtype while the patch is
installed, i.e. about the LoRA file's size in bf16 for a LoRA on every layer (a few MB per Flux layer at
rank 64). ComfyUI's loader does not count them; the per-call form it replaces needed a transient of a
whole dequantized weight plus ``up @ down`` per layer instead. Offloaded layers, which ComfyUI patches
with its own ``LowVramPatch``, keep the per-call form: there VRAM is what is short.

``adopt_patcher(mp)`` switches a ModelPatcher (e.g. the one ``comfy.sd.load_diffusion_model_state_dict``
returns) to this subclass in place; ``clone()`` keeps the class (it uses ``self.__class__`` in 0.3.75
and 0.29), so LoRA loaders' clones stay adopted.
"""

from __future__ import annotations

import comfy.lora
import comfy.model_patcher
import comfy.utils
import torch

from . import capabilities as caps
from . import dispatch, dynamic_vram

try:  # 0.3.75 and later represent a loaded LoRA as a LoRAAdapter; older cores as ("lora", weights)
    from comfy.weight_adapter.lora import LoRAAdapter
except ImportError:  # pragma: no cover - depends on the core
    LoRAAdapter = None


class OnTheFlyPatch:
    """Applies ``patches[key]`` to a float weight; ``key`` lets ComfyUI's own low-VRAM patch take over."""

    def __init__(self, key, patches):
        self.key = key
        self.patches = patches
        self._factors: dict = {}  # (device, dtype) -> (patch list, its length, factors or None)

    def __call__(self, weight):
        return comfy.lora.calculate_weight(self.patches[self.key], weight, self.key, intermediate_dtype=weight.dtype)

    def low_rank(self, device, dtype, shape):
        """``(down [R, K], up [N, R])`` on ``device`` in ``dtype`` when every patch of this key is a plain
        LoRA (``_plain_lora``), each one's ``strength * alpha / rank`` folded into its ``up`` and the
        ranks concatenated; else None. Kept per device and dtype while the patch list is the same
        object with the same length: the factors move to the GPU once."""
        entries = self.patches.get(self.key)
        if not entries:
            return None
        hit = self._factors.get((device, dtype))
        if hit is not None and hit[0] is entries and hit[1] == len(entries):
            return hit[2]
        parts = [_plain_lora(p, shape) for p in entries]
        factors = None
        if all(part is not None for part in parts):
            # joined (and scaled) in float32 where the patches live, then one copy each to the device
            down = torch.cat([d.to(torch.float32) for _, d, _ in parts])
            up = torch.cat([u.to(torch.float32) * s for u, _, s in parts], dim=1)
            factors = (down.to(device, dtype), up.to(device, dtype))
        self._factors[(device, dtype)] = (entries, len(entries), factors)
        return factors


def _plain_lora(patch, shape):
    """``(up [N, r], down [r, K], scale)`` of one patch-list entry (``ModelPatcher.add_patches``:
    ``(strength, adapter, strength_model, offset, function)``) that ``calculate_weight`` would apply as
    ``W += strength * alpha / r * up @ down`` -- a LoRA without mid / DoRA / reshape, on the whole
    weight (no offset), no function, ``strength_model`` 1 -- else None."""
    if len(patch) != 5:
        return None
    strength, v, strength_model, offset, function = patch
    if strength_model != 1.0 or offset is not None or function is not None:
        return None
    if LoRAAdapter is not None and type(v) is LoRAAdapter:
        w = v.weights
    elif isinstance(v, tuple) and len(v) == 2 and v[0] == "lora":
        w = v[1]
    else:
        return None
    if len(w) != 6:
        return None
    up, down, alpha, mid, dora_scale, reshape = w
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.ndim == 2 and down.ndim == 2
            and up.shape[1] == down.shape[0] and (up.shape[0], down.shape[1]) == tuple(shape)):
        return None
    rank = down.shape[0]
    return up, down, float(strength) * (float(alpha) / rank if alpha is not None else 1.0)


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
