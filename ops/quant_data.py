"""Per-layer quantized data: what a HybridQuant Linear holds besides stock ComfyUI's weight/bias.

No ComfyUI import here: this module reads a layer's tensors out of a state dict (through
``converter.metadata`` discovery and the format codecs -- no format math of its own), and prepares the
device-specific form once at load (MXFP8 / Hybrid MXFP8 re-expressed as tensorwise FP8 for Ada/Hopper).

Naming: the packed/quantized main tensor always lives in the module's ``weight`` Parameter (so
ComfyUI's LoRA / backup / pinning machinery finds it); every other tensor of the codec (``weight_scale``,
``weight.absmax`` ...) is a registered buffer named ``hq_`` + suffix with dots as ``__``. The state dict
the module writes uses the on-disk suffixes again, so a saved model is a valid file.
"""

from __future__ import annotations

import logging

import torch

from ..converter import metadata as qmeta
from ..converter import transforms as tfm
from ..converter.formats import FormatError, get_codec

log = logging.getLogger("hybridquant.ops")

# Key under which ``ops.state_dict.prepare_state_dict`` moves a packed/padded ``<layer>.weight`` so that
# ``<layer>.weight`` can show model detection the logical shape.
STORAGE_SUFFIX = "weight_qdata"



# Tensors of the low-rank branch (``converter.transforms``): registered buffers like the codec's.
TRANSFORM_TENSORS = tfm.TENSORS


def transforms_core(w: torch.Tensor, tensors: dict, t: dict) -> torch.Tensor:
    """What the codec must store for a transformed layer to decode to ``w``."""
    return tfm.to_core(w, tensors, t)


def buffer_name(suffix: str) -> str:
    return "hq_" + suffix.replace(".", "__")


def layer_keys(state_dict, prefix: str) -> list[str]:
    return [k for k in state_dict if k.startswith(prefix)]


def is_quantized_in(state_dict, prefix: str) -> bool:
    """Cheap probe: does ``state_dict`` hold a quantized layer at ``prefix`` (``"x.y."``)?"""
    if prefix + "comfy_quant" in state_dict or prefix + STORAGE_SUFFIX in state_dict:
        return True
    if prefix + "scale_weight" in state_dict:
        return True
    return any(prefix + qmeta.BNB_STATE_PREFIX + qt in state_dict for qt in qmeta.BNB_FORMATS)


def read_layer(state_dict, prefix: str, shape: tuple[int, int]):
    """(LayerInfo, tensors by suffix) of the quantized layer at ``prefix``; FormatError names the layer.

    Accepts both a prepared state dict (packed weight under ``STORAGE_SUFFIX``, a logical-shape
    placeholder under ``weight``) and a raw file's.
    """
    layer = prefix[:-1]
    keys = layer_keys(state_dict, prefix)
    view = {k: state_dict[k] for k in keys}
    if prefix + STORAGE_SUFFIX in view:
        view[prefix + "weight"] = view.pop(prefix + STORAGE_SUFFIX)
    from .state_dict import tensor_bytes

    infos = qmeta.discover_layers(list(view), None, view.__getitem__, sizes=tensor_bytes(view))
    info = infos.get(layer)
    if info is None:
        raise FormatError(f"{layer}: quantization keys present ({', '.join(k[len(prefix):] for k in keys)}) "
                          f"but no quantized layer could be read from them")
    tensors = qmeta.load_layer_tensors(info, view.__getitem__)
    unknown = [k[len(prefix):] for k in keys if k[len(prefix):] not in _consumed(info, prefix)]
    if unknown:
        raise FormatError(f"{layer}: unrecognised tensor(s) {unknown} for format {info.format!r}")
    qmeta.validate_layer(info, tensors, shape)
    return info, tensors


def _consumed(info, prefix: str) -> set[str]:
    used = {key[len(prefix):] for key in info.tensors.values()}
    used |= {key[len(prefix):] for key in getattr(info, "dropped", ())}
    return used | {"bias", "comfy_quant", STORAGE_SUFFIX, "weight"}


def bnb_state(info) -> dict:  # noqa: D401
    """The parsed bitsandbytes quant state (quant_type, blocksize, dtype, shape, nested_*)."""
    return dict(info.meta)


def scale_params(fmt: str, tensors: dict, shape, layer: str) -> dict:
    """The codec ``params`` that reproduce the stored scales exactly (for fixed-scale requantization).

    Requantizing a patched weight with the STORED scales means only ``weight`` changes, so ComfyUI's
    backup of ``weight`` restores the layer bit for bit on unpatch.
    """
    codec = get_codec(fmt)
    fn = getattr(codec, "stored_scale_params", None)
    if fn is not None:
        return fn(tensors, shape, layer)
    return {"weight_scale": tensors["weight_scale"]}  # FP8 / INT8 grids: the stored scale is the param


def to_tensorwise(fmt: str, tensors: dict, shape, layer: str):
    """MXFP8 / Hybrid MXFP8 -> (e4m3 [M, N], float32 scale [], its format name) re-expressed once at load
    by the hybrid codec (block codes shifted relative to the tensorwise scalar; plain MXFP8 uses the
    codec's default scalar)."""
    from ..converter.formats import hybrid_mxfp8

    w, s = hybrid_mxfp8.to_tensorwise_fp8(tensors, shape, layer)
    return w.contiguous(), s.to(torch.float32).reshape(()), hybrid_mxfp8.REEXPRESSED_FORMAT


def comfy_quant_tensor(meta: dict | None) -> torch.Tensor | None:
    if meta is None:
        return None
    return qmeta.encode_comfy_quant(meta)


def parse_json_tensor(t: torch.Tensor) -> dict:
    from ..converter.schema import loads

    return loads(bytes(t.reshape(-1).tolist()), "quant-state tensor")
