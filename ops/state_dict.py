"""Prepare a loaded quantized state dict for ComfyUI's stock loaders (no ComfyUI import).

``prepare_state_dict(sd, header_metadata) -> sd'`` returns a NEW dict (the input is not modified; the
tensors are shared, nothing is copied) in which, for every quantized layer found by
``converter.metadata.discover_layers`` (``.comfy_quant``, header-only, bitsandbytes 4-bit, legacy
scaled-FP8):

- ``<layer>.weight`` is a placeholder with the LOGICAL shape and the original dtype (an expanded
  0-dim zero: 2 bytes, no allocation), so model detection (e.g. Flux ``img_in`` / ``txt_in`` widths),
  ``calculate_parameters`` and ``weight_dtype`` see what the float model had; the stored tensor moves to
  ``<layer>.weight_qdata`` (``quant_data.STORAGE_SUFFIX``), where our Linear reads it.
- header-only and legacy layers get a ``<layer>.comfy_quant`` tensor (legacy ``scale_weight`` /
  ``scale_input`` renamed to ``weight_scale`` / ``input_scale``; the ``scaled_fp8`` markers dropped, so
  neither ComfyUI generation switches to its own scaled-FP8 ops).
- ``_quantization_metadata`` (0.3.75 copies the header string into checkpoint state dicts) is dropped.

Logical shape: ``orig_shape`` from the metadata / bitsandbytes quant state; else the stored shape for
the unpadded FP8/INT8 layouts; else (MXFP8 written without ``orig_shape``) the padded stored shape,
and for NVFP4 ``[rows, 2*cols]`` -- the module's own shape is what the layer validates against.
"""

from __future__ import annotations

import torch

from ..converter import metadata as qmeta
from ..converter.formats import FormatError, get_codec
from .quant_data import STORAGE_SUFFIX

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16, "torch.float32": torch.float32}


def _orig_dtype(info) -> torch.dtype:
    name = info.meta.get("orig_dtype") if info.source != "bnb" else info.meta.get("dtype")
    return _DTYPES.get(str(name), torch.bfloat16)


def logical_shape(info, weight: torch.Tensor) -> tuple[int, int]:
    if info.orig_shape is not None:
        return tuple(info.orig_shape)
    shape = get_codec(info.format).logical_shape(tuple(weight.shape), info.meta)
    if shape is None:
        raise FormatError(f"{info.layer}: cannot tell the logical shape of a {info.format} layer "
                          f"(no orig_shape in its metadata)")
    return shape


def tensor_bytes(sd):
    """``sizes`` for ``discover_layers``: the stored bytes of each tensor of a state dict (0 for a value
    that is not a tensor), so that metadata cannot announce a layer larger than its data."""
    def size(key: str) -> int:
        t = sd.get(key)
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    return size


def placeholder(shape, dtype) -> torch.Tensor:
    """A read-only-in-spirit tensor of ``shape``/``dtype`` that occupies 1 element of memory."""
    return torch.zeros((), dtype=dtype).expand(*shape)


def prepare_state_dict(sd: dict, header_metadata: dict | None) -> dict:
    keys = list(sd.keys())
    infos = qmeta.discover_layers(keys, header_metadata, sd.__getitem__, sizes=tensor_bytes(sd))
    out = {k: v for k, v in sd.items() if k != qmeta.QUANT_METADATA_KEY}
    for layer, info in infos.items():
        p = layer + "."
        if p + STORAGE_SUFFIX in out:
            continue  # already prepared
        weight = out[p + "weight"]
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise FormatError(f"{layer}: quantized weight must be a 2-D tensor, found "
                              f"{tuple(getattr(weight, 'shape', ()))}")
        if info.source in ("header", "legacy_scaled_fp8") or (info.transforms and p + "comfy_quant" not in out):
            out[p + "comfy_quant"] = qmeta.encode_comfy_quant(info.comfy_quant())
        if info.source == "legacy_scaled_fp8":
            for key in info.dropped:  # a placeholder scale_input of 1.0: no data, and no reader wants it
                out.pop(key, None)
            for suffix, key in info.tensors.items():
                if key != p + suffix:
                    out[p + suffix] = out.pop(key)
        out[p + STORAGE_SUFFIX] = out.pop(p + "weight")
        out[p + "weight"] = placeholder(logical_shape(info, weight), _orig_dtype(info))
    if any(i.source == "legacy_scaled_fp8" for i in infos.values()):
        for k in [k for k in out if k == qmeta.LEGACY_MARKER or k.endswith("." + qmeta.LEGACY_MARKER)]:
            del out[k]
    return out
