"""``decode_file(path)``: the float weight of every quantized layer of a file, as a reader computes with.

For tools that measure quality (a quantized file against its source): each layer found by
``metadata.discover_layers`` (``.comfy_quant``, header-only, bitsandbytes 4-bit, legacy scaled FP8) is
validated and decoded by its codec, with its transforms (``transforms.decode``: rotation and low-rank
branch) applied. Layers are decoded one at a time, reading only their own tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from . import metadata as qmeta
from . import transforms as tfm
from .formats import FormatError, get_codec
from .safetensors_io import SafetensorsReader, read_header


def _shape(info: qmeta.LayerInfo, tensors) -> tuple[int, int]:
    if info.orig_shape is not None:
        return tuple(info.orig_shape)
    shape = get_codec(info.format).logical_shape(tuple(tensors["weight"].shape), info.meta)
    if shape is None:
        raise FormatError(f"{info.layer}: logical shape of this {info.format} layer is unknown (no orig_shape)")
    return shape


def decode_layer(info: qmeta.LayerInfo, tensors, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The decoded ``[out, in]`` weight of one discovered layer from its tensors (by suffix)."""
    shape = _shape(info, tensors)
    qmeta.validate_layer(info, tensors, shape)
    opts = {k: v for k, v in info.options.items() if k != "dtype"}  # bitsandbytes' original dtype
    return tfm.decode(get_codec(info.format), tensors, shape, info.transforms, dtype, **opts)


def iter_decoded(path, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """``(layer, decoded weight)`` for every quantized layer of ``path``, in file order."""
    path = os.fspath(path)
    infos, header = read_header(path)
    with SafetensorsReader(path) as reader:
        layers = qmeta.discover_layers(list(infos), header, reader.read)
        for layer, info in layers.items():
            tensors = qmeta.load_layer_tensors(info, reader.read)
            yield layer, decode_layer(info, tensors, dtype)


def decode_file(path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``{layer: decoded float weight [out, in]}`` for every quantized layer of the ``.safetensors`` file."""
    return dict(iter_decoded(path, dtype))


__all__ = ["decode_file", "iter_decoded", "decode_layer"]
