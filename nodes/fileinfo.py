"""What the "Quantization Info" node and the web panel say about a model file.

Discovery is the converter's (``converter.inspect_file``: header + small metadata tensors, cached by
path, size and mtime): this module only shapes it for people -- per-layer rows (name, format, logical
shape, bytes), counts and bytes by format with the registry's labels, whether the RUNNING ComfyUI core
can load the file with its stock loaders (its ``QUANT_ALGOS``, read by ``ops.capabilities``) and which
matmul path each format gets on this machine (``capabilities_view``). No ComfyUI import at module level.
"""

from __future__ import annotations

import os
import re

from ..converter.formats import registry


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def label_of(fmt: str) -> str:
    spec = registry.find_spec(fmt)
    return spec.label if spec is not None else fmt


# ComfyUI's stock CLIP loader builds CLIP text encoders (HF ``text_model.*`` keys) without reading
# ``.comfy_quant``: measured on 0.3.75 and 0.33 (bench/RESULTS_ARCH.md: a quantized CLIP-L file loads its
# FP8/INT8 codes without their scales, rel. err 0.97; 4-bit files fail on the packed shape).
_STOCK_IGNORES_QUANT = ("text_model.encoder.layers.",)


def stock_loadable(quantized_formats, core_algos, layer_names=()) -> dict:
    """Whether the running core's stock loaders read every quantized format of a file.

    ``core_algos`` is ``ops.capabilities.core_quant_algos()`` (None: cannot tell). A file without
    quantized layers is plain: every loader reads it. ``layer_names``: the quantized layers' names
    (CLIP text encoders need the pack's loaders whatever the format)."""
    fmts = sorted(set(quantized_formats))
    if not fmts:
        return {"stock": True, "text": "not quantized: any loader reads it"}
    if any(m in n for n in layer_names for m in _STOCK_IGNORES_QUANT):
        return {"stock": False, "missing": [],
                "text": "needs the HybridQuant loaders: ComfyUI's stock CLIP loader ignores the quantization "
                        "of CLIP text encoders"}
    if core_algos is None:
        return {"stock": None, "text": "load it with the HybridQuant loaders (this ComfyUI's own list of "
                                       "formats could not be read)"}
    missing = [f for f in fmts if f not in core_algos]
    if not missing:
        return {"stock": True, "text": "this ComfyUI's stock loaders read it too"}
    return {"stock": False, "missing": missing,
            "text": "needs the HybridQuant loaders: this ComfyUI does not know "
                    + ", ".join(label_of(f) for f in missing)}


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def file_summary(path, core_algos=None, display_name: str | None = None) -> dict:
    """The panel's / Info node's payload for one file. Raises the converter's ``InputFileError`` or
    ``FormatError`` (their messages name the file or the layer)."""
    from ..converter import inspect_file

    info = inspect_file(path)
    layers = sorted(info.layers, key=lambda d: _natural_key(d.name))
    formats = info.formats()
    order = list(formats)
    quantized = [f for f in order if any(d.quantized and d.format == f for d in layers)]
    out = {
        "file": display_name or os.path.basename(os.fspath(path)),
        "size_bytes": info.size_bytes,
        "tensor_count": info.tensor_count,
        "layer_count": len(layers),
        "quantized_layers": info.quantized_layers,
        "formats": formats,
        "bytes_by_format": info.bytes_by_format(),
        "labels": {f: label_of(f) for f in order},
        "quantized_formats": quantized,
        "other_tensors": info.other_tensors,
        "other_bytes": info.other_bytes,
        "layers": [{"name": d.name, "format": d.format, "quantized": d.quantized,
                    "shape": list(d.shape) if d.shape else None, "bytes": d.nbytes} for d in layers],
        "format_legend": order,
        "format_map": [order.index(d.format) for d in layers],
    }
    out["loading"] = stock_loadable(quantized, core_algos, [d.name for d in layers if d.quantized])
    return out


def format_summary_text(summary: dict, max_layers: int | None = None) -> str:
    """The text the "Quantization Info" node shows: a header, then one row per layer."""
    lab = summary.get("labels", {})
    lines = [f"{summary['file']}: {human_bytes(summary['size_bytes'])}, {summary['layer_count']} layers "
             f"({summary['quantized_layers']} quantized), {summary['tensor_count']} tensors"]
    for fmt, n in summary["formats"].items():
        lines.append(f"  {lab.get(fmt, fmt)}: {n} layers, {human_bytes(summary['bytes_by_format'][fmt])}")
    lines.append(f"  other tensors (biases, norms, embeddings): {summary['other_tensors']}, "
                 f"{human_bytes(summary['other_bytes'])}")
    lines.append("  " + summary["loading"]["text"])
    fast = summary.get("fast_path") or {}
    if fast.get("available") and fast.get("formats"):
        for fmt, v in fast["formats"].items():
            if fmt in summary.get("quantized_formats", []):
                lines.append(f"  {lab.get(fmt, fmt)} here: {v['path']}")
    lines.append("")
    layers = summary["layers"] if max_layers is None else summary["layers"][:max_layers]
    width = max((len(d["name"]) for d in layers), default=0)
    lines.append(f"{'layer':<{width}}  {'format':<14} {'shape (out x in)':<16} size")
    for d in layers:
        shape = " x ".join(str(s) for s in d["shape"]) if d["shape"] else "?"
        lines.append(f"{d['name']:<{width}}  {lab.get(d['format'], d['format']):<14} {shape:<16} "
                     f"{human_bytes(d['bytes'])}")
    if max_layers is not None and len(summary["layers"]) > max_layers:
        lines.append(f"... {len(summary['layers']) - max_layers} more layers")
    return "\n".join(lines)
