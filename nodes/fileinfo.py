"""Per-layer format summary of a ``.safetensors`` file, from its HEADER ONLY (no tensor data is read).

Used by the "Quantization Info" node and by the ``/hybridquant/file_info`` route that feeds the web
extension. Pure Python + the converter's header parser: no ComfyUI import, so it is unit-testable.

How a layer's format is decided (DESIGN.md §2), in this order:
1. ``<layer>.weight.quant_state.bitsandbytes__nf4`` / ``__fp4`` key -> ``bnb_nf4`` / ``bnb_fp4``.
2. ``__metadata__["_quantization_metadata"]["layers"][layer]["format"]`` for ``.comfy_quant`` layers.
3. A ``.comfy_quant`` layer missing from the header metadata: inferred from the dtypes/shapes of its
   tensors (the ``.comfy_quant`` JSON itself is tensor DATA, which this module never reads).
4. Any other 2-D ``<layer>.weight`` is unquantized; its format is its dtype (``bf16``, ``fp16``, ...).
Everything else (biases of unquantized layers, norms, embeddings' 1-D params) counts as "other".
"""

from __future__ import annotations

import json
import os
import re

import torch

from ..converter.safetensors_io import read_header

# Suffixes of the tensors that belong to one quantized layer (longest first so ".weight.absmax"
# is not taken for ".weight").
_LAYER_SUFFIXES = tuple(sorted((
    ".weight", ".bias", ".comfy_quant", ".weight_scale", ".weight_scale_2", ".weight_scalar",
    ".input_scale", ".weight.absmax", ".weight.quant_map", ".weight.nested_absmax",
    ".weight.nested_quant_map", ".weight.quant_state.bitsandbytes__nf4",
    ".weight.quant_state.bitsandbytes__fp4",
), key=len, reverse=True))

_DTYPE_NAMES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
}
for _attr, _nm in (("float8_e4m3fn", "fp8_e4m3fn (raw)"), ("float8_e5m2", "fp8_e5m2 (raw)")):
    if hasattr(torch, _attr):
        _DTYPE_NAMES[getattr(torch, _attr)] = _nm

# Formats this pack's ops accept and stock ComfyUI does not (DESIGN.md §2), for the "needs our
# loader" hint in the summary.
STOCK_FORMATS = {"float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "mxfp8", "nvfp4"}
UNQUANTIZED = set(_DTYPE_NAMES.values())


def _split(key: str) -> tuple[str, str] | None:
    for suf in _LAYER_SUFFIXES:
        if key.endswith(suf) and len(key) > len(suf):
            return key[: -len(suf)], suf
    return None


def _natural_key(name: str):
    # "blocks.10" after "blocks.9": split digits so block order reads naturally in the map.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _infer_comfy_quant(parts: dict) -> str:
    """Best guess of a .comfy_quant layer's format from its tensors' dtypes/shapes (header only)."""
    w = parts.get(".weight")
    sc = parts.get(".weight_scale")
    if w is None:
        return "unknown"
    if ".weight_scale_2" in parts:
        return "nvfp4"
    if w.dtype == getattr(torch, "float8_e4m3fn", None) or w.dtype == getattr(torch, "float8_e5m2", None):
        if sc is not None and sc.dtype == torch.uint8:
            return "hybrid_mxfp8" if ".weight_scalar" in parts else "mxfp8"
        if w.dtype == getattr(torch, "float8_e5m2", None):
            return "float8_e5m2"
        if sc is None or len(sc.shape) == 0:
            return "float8_e4m3fn"
        return "float8_e4m3fn_rowwise" if len(sc.shape) == 1 else "float8_e4m3fn_blockwise"
    if w.dtype == torch.int8:
        if sc is not None and len(sc.shape) == 2 and sc.shape[1] != 1:
            return "int8_blockwise"
        return "int8_tensorwise"
    return "unknown"


def file_summary(path) -> dict:
    """Summary of one file: per-layer formats and sizes, counts and bytes by format.

    Raises the converter's ``InputFileError`` (message names the file) for anything that is not a
    readable safetensors file.
    """
    path = os.fspath(path)
    infos, metadata = read_header(path)
    header_layers: dict = {}
    raw_qm = metadata.get("_quantization_metadata")
    header_error = None
    if raw_qm:
        try:
            qm = json.loads(raw_qm)
            header_layers = qm.get("layers", {}) if isinstance(qm, dict) else {}
            if not isinstance(header_layers, dict):
                header_layers = {}
        except json.JSONDecodeError as e:
            header_error = f"_quantization_metadata is not valid JSON ({e.msg})"

    groups: dict[str, dict] = {}
    other_bytes = 0
    other_count = 0
    for name, info in infos.items():
        sp = _split(name)
        if sp is None:
            other_bytes += info.nbytes
            other_count += 1
            continue
        layer, suf = sp
        groups.setdefault(layer, {})[suf] = info

    layers = []
    for layer, parts in groups.items():
        fmt = None
        nbytes = sum(i.nbytes for i in parts.values())
        w = parts.get(".weight")
        if ".weight.quant_state.bitsandbytes__nf4" in parts:
            fmt = "bnb_nf4"
        elif ".weight.quant_state.bitsandbytes__fp4" in parts:
            fmt = "bnb_fp4"
        elif ".comfy_quant" in parts or layer in header_layers:
            entry = header_layers.get(layer)
            fmt = entry.get("format") if isinstance(entry, dict) else None
            fmt = fmt or _infer_comfy_quant(parts)
        elif w is not None and len(w.shape) >= 2:
            fmt = _DTYPE_NAMES.get(w.dtype, str(w.dtype).replace("torch.", ""))
        if fmt is None:
            # A 1-D ".weight" (norm) or a lone bias: not a layer we quantize.
            other_bytes += nbytes
            other_count += len(parts)
            continue
        # Stored shape; a bitsandbytes weight is packed [n/2, 1] and its logical shape lives in the
        # quant_state tensor DATA, which we do not read: report it as unknown.
        shape = list(w.shape) if w is not None and not fmt.startswith("bnb_") else None
        layers.append({"name": layer, "format": fmt, "bytes": nbytes, "shape": shape})
    layers.sort(key=lambda d: _natural_key(d["name"]))

    formats: dict[str, int] = {}
    bytes_by_format: dict[str, int] = {}
    for d in layers:
        formats[d["format"]] = formats.get(d["format"], 0) + 1
        bytes_by_format[d["format"]] = bytes_by_format.get(d["format"], 0) + d["bytes"]
    order = sorted(formats, key=lambda f: (-formats[f], f))
    quantized = sum(n for f, n in formats.items() if f not in UNQUANTIZED)
    out = {
        "file": os.path.basename(path),
        "size_bytes": os.path.getsize(path),
        "tensor_count": len(infos),
        "layer_count": len(layers),
        "quantized_layers": quantized,
        "formats": {f: formats[f] for f in order},
        "bytes_by_format": {f: bytes_by_format[f] for f in order},
        "other_tensors": other_count,
        "other_bytes": other_bytes,
        "needs_hybridquant_loader": any(f not in STOCK_FORMATS and f not in UNQUANTIZED for f in formats),
        "layers": layers,
        # Compact map for the web picture: one small int per layer (index into format_legend).
        "format_legend": order,
        "format_map": [order.index(d["format"]) for d in layers],
    }
    if header_error:
        out["warning"] = header_error
    return out


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def format_summary_text(summary: dict, max_layers: int | None = None) -> str:
    """The text the "Quantization Info" node shows: header lines, then one line per layer."""
    lines = [
        f"{summary['file']}: {human_bytes(summary['size_bytes'])}, {summary['tensor_count']} tensors, "
        f"{summary['layer_count']} layers ({summary['quantized_layers']} quantized)",
    ]
    for fmt, n in summary["formats"].items():
        lines.append(f"  {fmt}: {n} layers, {human_bytes(summary['bytes_by_format'][fmt])}")
    lines.append(f"  other tensors: {summary['other_tensors']}, {human_bytes(summary['other_bytes'])}")
    if summary.get("needs_hybridquant_loader"):
        lines.append("  needs the HybridQuant loaders (formats stock ComfyUI does not read)")
    if summary.get("warning"):
        lines.append(f"  warning: {summary['warning']}")
    lines.append("")
    layers = summary["layers"] if max_layers is None else summary["layers"][:max_layers]
    width = max((len(d["name"]) for d in layers), default=0)
    for d in layers:
        shape = "x".join(str(s) for s in d["shape"]) if d["shape"] else "?"
        lines.append(f"{d['name']:<{width}}  {d['format']:<24} {shape:<14} {human_bytes(d['bytes'])}")
    if max_layers is not None and len(summary["layers"]) > max_layers:
        lines.append(f"... {len(summary['layers']) - max_layers} more layers")
    return "\n".join(lines)
