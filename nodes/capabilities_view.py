"""What the web panel says about this machine's matmul paths: ``ops.dispatch.kernel_for`` per format
(the same question the layers ask at run time) with ``ops.dispatch.LABELS`` as the words."""

from __future__ import annotations


def _device():
    import comfy.model_management as mm

    return mm.get_torch_device()


def _describe(caps, dev) -> dict:
    cap = caps.device_capability(dev)
    return {"device": caps.device_key(dev), "capability": list(cap) if cap else None,
            "features": list(caps.features(dev))}


def device_report() -> dict:
    try:
        from ..ops import capabilities as caps

        return {"available": True, **_describe(caps, _device()), "core_formats": _core_formats(caps)}
    except Exception as e:  # noqa: BLE001 - the page shows the reason instead of a guess
        return {"available": False, "reason": f"device capabilities unavailable: {type(e).__name__}: {e}"}


def _core_formats(caps):
    algos = caps.core_quant_algos()
    return sorted(algos) if algos is not None else None


def fast_path_for_formats(formats, quantized=None) -> dict:
    """Per QUANTIZED format present: {"path": words, "kernel": id, "fast": bool}; plus the device.
    Unquantized formats are not listed: they run as in stock ComfyUI."""
    try:
        from ..ops import capabilities as caps
        from ..ops import dispatch

        dev = _device()
        d = _describe(caps, dev)
    except Exception as e:  # noqa: BLE001
        return {"available": False, "reason": f"device capabilities unavailable: {type(e).__name__}: {e}"}
    quantized = list(formats) if quantized is None else list(quantized)
    out = {}
    for fmt in quantized:
        kernel = dispatch.kernel_for(fmt, dev)
        out[fmt] = {"kernel": kernel, "path": dispatch.LABELS.get(kernel, kernel), "fast": kernel != dispatch.DEQUANT}
    return {"available": True, "device": d["device"], "formats": out,
            "any_fast": any(v["fast"] for v in out.values()), "quantized": bool(out)}
