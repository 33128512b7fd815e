"""The direct call: a layer whose weights already sit on the input's device, in the form the call
needs, with nothing patched, skips ComfyUI's ``cast_bias_weight``.

Why: the eager forward of a quantized model is host-bound (at the time, bench/RESULTS_H200_stop18.md: the pack's Flux
forward needed 21-49 ms of CPU time to enqueue against bf16's 11-15 ms while its GPU time was 1.25x
shorter; bench/bench_host.py: 177 us per FP8 layer call against 34 us for a stock Linear). Part of that
is ComfyUI's per-call cast machinery, which for such a layer returns the module's own tensors
unchanged: ``cast_bias_weight`` with the weight on the device, no ``weight_function`` /
``bias_function`` and matching dtypes moves nothing, copies nothing and uses no offload stream (in
0.3.75 and 0.33 alike; in 0.33 a dynamic-VRAM (aimdo) module whose weight is on the device takes the
same plain branch). Stock ComfyUI does the same skip with ``comfy_cast_weights = False``
(``disable_weight_init``); the pack's classes derive from ``manual_cast`` (files may store plain layers
in another dtype than the compute dtype), where that flag is always set, so the decision is per call.

Everything else (offloaded or partially loaded modules, LoRA / low-VRAM patches, dtype casts) still
goes through ``cast_bias_weight`` exactly as before.
"""

from __future__ import annotations

import comfy.ops

_run_every_op = getattr(comfy.ops, "run_every_op", None)  # interrupt check; absent on old cores


def run_every_op() -> None:
    if _run_every_op is not None:
        _run_every_op()


def managed(module) -> bool:
    """Whether ComfyUI 0.33's dynamic VRAM (comfy-aimdo) manages ``module`` (its ``_v`` allocation) or
    attached a patch it applies itself (``*_lowvram_function``): then the core's cast must run."""
    d = module.__dict__
    return "_v" in d or "weight_lowvram_function" in d or "bias_lowvram_function" in d


def plain_ready(module, x) -> bool:
    """Whether ``cast_bias_weight(module, x)`` would hand back the module's own weight and bias: nothing
    patched, not managed by dynamic VRAM, both on ``x``'s device and already in ``x``'s dtype (or absent)."""
    if module.weight_function or module.bias_function or managed(module):
        return False
    dev, dt = x.device, x.dtype
    w = module.weight
    if w is not None and (w.device != dev or w.dtype != dt):
        return False
    b = getattr(module, "bias", None)
    return b is None or (b.device == dev and b.dtype == dt)


def make_direct(base, plain_base):
    """``base`` (a ``comfy.ops.manual_cast`` class) with the direct call: when ``plain_ready``, run
    ``plain_base``'s parent forward (what ``disable_weight_init`` runs when nothing is cast), else
    ComfyUI's own cast path. Calls with keyword arguments keep the stock path (e.g. 0.33's
    ``Conv3d(autopad=...)`` needs it)."""

    class Direct(base):
        def forward(self, *args, **kwargs):
            if args and not kwargs and plain_ready(self, args[0]):
                run_every_op()
                return super(plain_base, self).forward(*args)
            return super().forward(*args, **kwargs)

    Direct.__name__ = Direct.__qualname__ = base.__name__
    return Direct
