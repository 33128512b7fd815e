"""What the web summary says about this machine's matmul paths, from ``ops.capabilities``.

``ops/capabilities.py`` is the one place that decides the matmul path of a device (DESIGN.md §4):
``path_for(device)`` -> "mx_blockscaled" | "fp8_tensorwise" | "dequant", and
``bnb_cuda_available(device)`` for bitsandbytes 4-bit layers. This module only maps those answers
onto the formats present in a file, for the routes' JSON. Which formats ride which path follows
DESIGN.md §4: MXFP8 / Hybrid MXFP8 use the block-scaled MX matmul on SM >= 10 and are re-expressed as
tensorwise FP8 on SM 8.9/9.x; tensorwise FP8 uses ``_scaled_mm`` on both; every other format
dequantizes per layer per call.
"""

from __future__ import annotations

UNQUANTIZED = {"bf16", "fp16", "fp32", "fp64"}
_FAST = {
    "mx_blockscaled": {"mxfp8": "MXFP8 block-scaled matmul", "hybrid_mxfp8": "MXFP8 block-scaled matmul",
                       "float8_e4m3fn": "FP8 tensorwise _scaled_mm"},
    "fp8_tensorwise": {"mxfp8": "FP8 tensorwise _scaled_mm (re-expressed at load)",
                       "hybrid_mxfp8": "FP8 tensorwise _scaled_mm (re-expressed at load)",
                       "float8_e4m3fn": "FP8 tensorwise _scaled_mm"},
}


def _device():
    import comfy.model_management as mm

    return mm.get_torch_device()


def _describe(caps, dev) -> dict:
    cap = caps.device_capability(dev)
    return {"device": caps.device_key(dev), "capability": list(cap) if cap else None,
            "path": caps.path_for(dev), "bnb_cuda": caps.bnb_cuda_available(dev)}


def device_report() -> dict:
    try:
        from ..ops import capabilities as caps

        return {"available": True, **_describe(caps, _device())}
    except Exception as e:  # noqa: BLE001 - the page shows the reason instead of a guess
        return {"available": False, "reason": f"ops.capabilities unavailable: {type(e).__name__}: {e}"}


def fast_path_for_formats(formats) -> dict:
    """Per format present: {"path": what runs it here, "fast": bool}; plus the device."""
    try:
        from ..ops import capabilities as caps

        dev = _device()
        d = _describe(caps, dev)
    except Exception as e:  # noqa: BLE001
        return {"available": False, "reason": f"ops.capabilities unavailable: {type(e).__name__}: {e}"}
    out = {}
    for fmt in formats:
        if fmt in UNQUANTIZED:
            out[fmt] = {"path": "native", "fast": False}
        elif fmt.startswith("bnb_"):
            out[fmt] = ({"path": "bitsandbytes CUDA kernels", "fast": True} if d["bnb_cuda"]
                        else {"path": "dequantize per call", "fast": False})
        elif fmt in _FAST.get(d["path"], {}):
            out[fmt] = {"path": _FAST[d["path"]][fmt], "fast": True}
        else:
            out[fmt] = {"path": "dequantize per call", "fast": False}
    return {"available": True, "device": d["device"], "device_path": d["path"], "formats": out,
            "any_fast": any(v["fast"] for v in out.values())}
