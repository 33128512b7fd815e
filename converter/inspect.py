"""What a ``.safetensors`` file holds, layer by layer, without reading its weights.

``inspect_file(path) -> FileInfo`` reads the header and, of the data, only the small metadata tensors
that discovery needs (``.comfy_quant``, bitsandbytes quant states, ``scaled_fp8`` markers: a few hundred
bytes each), then describes every layer with ``metadata.discover_layers`` -- the same discovery the
converter and the loaders use, so the Info node, the web panel and a load can never disagree about a
layer's format. Results are cached by (path, size, mtime): the routes ask again for every redraw.

A layer is a ``<layer>.weight`` tensor of 2 dimensions (quantized or not); everything else (biases of
plain layers, norms, 1-D weights) counts as "other tensors". A quantized layer's bytes include all of its
tensors (scales, quant state, bias); its shape is the logical ``(out, in)`` shape, from the metadata
(``orig_shape``, the bitsandbytes quant state) or, for layouts stored at their logical shape, the stored
weight; None when the file does not say.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch

from . import metadata as qmeta
from .formats import get_codec
from .safetensors_io import SafetensorsReader, TensorInfo

# discovery reads these tensors' DATA; anything larger is refused rather than read (a header can lie)
_SMALL_TENSOR_BYTES = 1 << 16
_CACHE_ENTRIES = 256

# Display names of unquantized weight dtypes (what the panel shows for a plain layer).
PLAIN_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


@dataclass(frozen=True)
class LayerSummary:
    name: str  # layer prefix, e.g. "double_blocks.0.img_attn.qkv"
    format: str  # a registry format name, or the plain dtype's short name ("bf16")
    quantized: bool
    shape: tuple[int, int] | None  # logical (out_features, in_features)
    nbytes: int  # every tensor of the layer
    options: dict = field(default_factory=dict)  # the layer's metadata (group_size, per_row, ...)

    def as_dict(self) -> dict:
        return {"name": self.name, "format": self.format, "quantized": self.quantized,
                "shape": list(self.shape) if self.shape else None, "bytes": self.nbytes,
                "options": dict(self.options)}


@dataclass(frozen=True)
class FileInfo:
    path: str
    size_bytes: int
    tensor_count: int
    metadata: dict  # the header's __metadata__ (str -> str)
    layers: tuple[LayerSummary, ...]
    other_tensors: int
    other_bytes: int

    @property
    def quantized_layers(self) -> int:
        return sum(1 for d in self.layers if d.quantized)

    def formats(self) -> dict[str, int]:
        """Layer count per format, most frequent first."""
        counts: dict[str, int] = {}
        for d in self.layers:
            counts[d.format] = counts.get(d.format, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def bytes_by_format(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.layers:
            out[d.format] = out.get(d.format, 0) + d.nbytes
        return {f: out[f] for f in self.formats()}


_cache: dict[tuple, FileInfo] = {}
_cache_lock = threading.Lock()


def inspect_file(path) -> FileInfo:
    """Describe every layer of a safetensors file (see the module docstring). Raises the converter's
    ``InputFileError`` (unreadable / not safetensors) or ``FormatError`` (inconsistent metadata),
    each naming the file or the layer."""
    path = os.fspath(path)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    info = _inspect(path, st.st_size)
    with _cache_lock:
        if len(_cache) >= _CACHE_ENTRIES:
            _cache.pop(next(iter(_cache)))
        _cache[key] = info
    return info


def _inspect(path: str, size: int) -> FileInfo:
    with SafetensorsReader(path) as reader:
        infos: dict[str, TensorInfo] = reader.infos

        def small_tensor(name: str) -> torch.Tensor:
            ti = infos[name]
            if ti.nbytes > _SMALL_TENSOR_BYTES:
                raise qmeta.FormatError(f"{path}: metadata tensor '{name}' is {ti.nbytes} bytes; refusing to read it")
            return reader.read(name)

        found = qmeta.discover_layers(list(infos), reader.metadata, small_tensor,
                                      sizes={n: ti.nbytes for n, ti in infos.items()})
        used: set[str] = set()
        layers: list[LayerSummary] = []
        for layer, li in found.items():
            keys = _layer_keys(layer, li, infos)
            used.update(keys)
            shape = li.orig_shape
            if shape is None:
                shape = get_codec(li.format).logical_shape(tuple(infos[f"{layer}.weight"].shape), li.meta)
                if get_codec(li.format).spec.storage != "exact":
                    shape = None  # a guess; the Info node shows "?" rather than a padded shape
            opts = {k: v for k, v in li.meta.items() if k != "format"} if li.source != "bnb" else dict(li.options)
            layers.append(LayerSummary(layer, li.format, True, shape, sum(infos[k].nbytes for k in keys), opts))
        for name, ti in infos.items():
            if name in used or not name.endswith(".weight") or len(ti.shape) != 2:
                continue
            layer = name[: -len(".weight")]
            keys = [k for k in (name, layer + ".bias") if k in infos and k not in used]
            used.update(keys)
            dname = str(ti.dtype).removeprefix("torch.")
            dtype = PLAIN_DTYPES.get(dname, dname)
            layers.append(LayerSummary(layer, dtype, False, (int(ti.shape[0]), int(ti.shape[1])),
                                       sum(infos[k].nbytes for k in keys)))
        other = [ti for n, ti in infos.items() if n not in used and n != qmeta.QUANT_METADATA_KEY]
        order = {k[: -len(".weight")]: i for i, k in enumerate(infos) if k.endswith(".weight")}
        layers.sort(key=lambda d: order.get(d.name, len(order)))
        return FileInfo(path, size, len(infos), dict(reader.metadata), tuple(layers), len(other),
                        sum(ti.nbytes for ti in other))


def _layer_keys(layer: str, li: qmeta.LayerInfo, infos) -> list[str]:
    keys = set(li.tensors.values()) | set(li.dropped)
    for extra in (f"{layer}.bias", f"{layer}.comfy_quant"):
        if extra in infos:
            keys.add(extra)
    return [k for k in infos if k in keys]
