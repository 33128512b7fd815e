"""Quantized layers under ComfyUI's dynamic VRAM (comfy-aimdo; ``ModelPatcherDynamic``, ComfyUI 0.33).

What the core does (read from 0.33's ``comfy/model_patcher.py`` ``ModelPatcherDynamic.load`` and
``comfy/ops.py`` ``cast_bias_weight`` / ``cast_modules_with_vbar`` / ``resolve_cast_module_with_vbar``):

- Every module with ``comfy_cast_weights`` whose ``module_size`` (its state dict's bytes) is over 16 KiB
  gets one virtual VRAM allocation ``m._v`` of ``vram_aligned_size(weight) + vram_aligned_size(bias)``,
  computed from ``weight._model_dtype`` (= ``weight.dtype`` here: our Linear never sets
  ``weight_comfy_model_dtype``), i.e. the STORED bytes of our packed/FP8/INT8 codes. weight and bias stay
  in RAM; at forward ``cast_bias_weight(s, ...)`` faults ``s._v`` in, copies ``[s.weight, s.bias]`` into
  it through a pinned staging buffer and keeps ``s._v_weight`` while the pages stay resident; aimdo evicts
  pages under VRAM pressure (the model's virtual size is ``model_size() * 10``).
- Every other parameter and every *buffer* is force-loaded to the GPU and counted in
  ``model_loaded_weight_memory``; modules of <= 16 KiB are force-loaded whole
  (``patch_weight_to_device(key, force_cast=True)``).
- LoRA arrives as ``m.weight_lowvram_function`` (a ``LowVramPatch``): the core applies it to the weight
  IT cast (``.to(dtype)``, ``QuantizedTensor.dequantize()``) and, while resident, writes the patched
  result back into the VRAM copy (stochastic rounding to the weight's dtype). ``weight_function``
  (wrapper patches) is applied to the same cast weight.

How a HybridQuant layer takes part (this module; the hooks in ``layers.py``, ``lora.py`` and
``nodes/backend.py`` are one line each):

- ``cast_target(layer)``: what the layer's forward hands ``cast_bias_weight`` when the patcher gave it
  ``_v``: a ``VbarView`` that shares the layer's instance ``__dict__`` (so ``_v``, ``_v_signature``,
  ``_v_weight``, ``_prefetch``, ``_pins``, ``_pin_state``, ``seed_key`` are the layer's own, and
  ``comfy.model_prefetch``, which walks ``model.modules()``, sees the same state), whose ``weight`` /
  ``bias`` are the layer's stored tensors and whose ``weight_function`` / ``weight_lowvram_function``
  are empty: applied by the core they would run on packed codes (and the write-back would corrupt the
  resident codes). The layer applies both itself, on its dequantized weight (``lowvram_patch`` in
  ``layers._hq_functions``): LoRA is computed per call like ComfyUI's classic low-VRAM patch, 8-bit
  layers with the fixed-scale round trip as before, 4-bit on the fly; the resident copy always holds
  the file's codes, so unpatching needs nothing.
- So the vbar holds exactly the stored weight (+ bias) and the codec's other tensors (scales, block
  scales, svd branch, bitsandbytes statistics: the ``hq_*`` buffers) are resident on the GPU, counted by
  the core. For 8-bit formats those are a few bytes to 3 % of the layer; for 4-bit formats 1/8 of the
  packed bytes and more with double quantization or an svd branch (``accounting``).
- ``force_load``: the small-module path moves the stored weight as it is. The classic path
  (``convert_weight`` -> ``set_weight``) would requantize an unpatched weight for nothing (and warn for
  4-bit layers).

On cores without the protocol (0.3.75, ``capabilities.core_dynamic_vram()`` False) none of this runs:
no module ever gets ``_v``.
"""

from __future__ import annotations

import collections

_NO_FUNCTIONS: tuple = ()


class VbarView:
    """A quantized layer as ``comfy.ops.cast_bias_weight`` should see it under dynamic VRAM (see module doc)."""

    __slots__ = ("_hq_layer", "__dict__")

    def __init__(self, layer):
        self._hq_layer = layer
        self.__dict__ = layer.__dict__  # one state: the core's _v/_prefetch/_pins bookkeeping is the layer's

    def __reduce_ex__(self, protocol):
        # A copied / pickled layer gets a fresh view on first use (a copy of this one would share the
        # OLD layer's dict: deepcopy rebuilds a module's __dict__ by update, not by identity).
        return (_no_view, ())

    @property
    def weight(self):
        return self._hq_layer.weight  # the stored (quantized) tensor: the vbar is sized and filled with it

    @property
    def bias(self):
        return self._hq_layer.bias

    @property
    def bias_function(self):
        return self._hq_layer.bias_function  # bias is a float tensor: the core's own handling is right

    @property
    def weight_function(self):
        return _NO_FUNCTIONS  # applied by the layer on the dequantized weight

    @property
    def weight_lowvram_function(self):
        return None  # LoRA: applied by the layer on the dequantized weight (lowvram_patch)


def _no_view():
    return None


def cast_target(layer):
    """A ``VbarView`` of ``layer`` when the dynamic patcher gave it a virtual allocation, else None.

    One view per layer, kept in the layer's dict: the core compares cast modules by identity
    (``LARGEST_AIMDO_CASTED_WEIGHT``) and its pin stacks hold them; a new object per call would also
    cost an allocation per layer per step."""
    d = layer.__dict__
    if "_v" not in d:
        return None
    view = d.get("_hq_vbar_view")
    if view is None:
        view = d["_hq_vbar_view"] = VbarView(layer)
    return view


def lowvram_patch(layer):
    """The LoRA patch the dynamic patcher attached to ``layer`` (None when there is none / elsewhere)."""
    return layer.__dict__.get("weight_lowvram_function")


def quantized_owner(model, key: str):
    """The HybridQuant quantized layer that owns ``key`` (``<layer>.weight``), or None."""
    import comfy.utils

    if not key.endswith(".weight"):
        return None
    try:
        m = comfy.utils.get_attr(model, key[: -len(".weight")])
    except AttributeError:
        return None
    return m if getattr(m, "hq_format", None) is not None else None


def force_load(patcher, key: str, device_to) -> None:
    """``ModelPatcherDynamic``'s force load of an unpatched quantized weight: back it up (its
    ``restore_loaded_backups`` puts it back) and move the stored tensor, dtype untouched."""
    import comfy.utils
    from comfy.model_patcher import get_key_weight

    weight, _, _ = get_key_weight(patcher.model, key)
    if key not in patcher.backup:
        patcher.backup[key] = collections.namedtuple("Dimension", ["weight", "inplace_update"])(weight, False)
    comfy.utils.set_attr_param(patcher.model, key, weight.to(device_to))


def accounting(model) -> dict:
    """Bytes of the pack's quantized layers as the dynamic patcher books them: ``vbar`` (weight + bias,
    1 KiB-aligned per tensor, what ``_v`` is sized to), ``resident`` (the codec's other tensors, force-loaded)
    and ``stored`` (their state-dict bytes, what ``model_size()`` counts)."""
    from comfy.memory_management import vram_aligned_size
    from comfy.model_management import module_size

    out = {"layers": 0, "vbar": 0, "resident": 0, "stored": 0}
    for m in model.modules():
        if getattr(m, "hq_format", None) is None:
            continue
        out["layers"] += 1
        out["vbar"] += vram_aligned_size([m.weight, m.bias])
        out["resident"] += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
        out["stored"] += module_size(m)
    return out
