"""The output file of a conversion as a function of its plan, known before any data is read.

``OutputLayout`` holds every output tensor's spec in order (from ``codec.output_specs`` and the
transforms'), the ``.comfy_quant`` tensors and the header metadata, so the streaming writer can place
each tensor at its final offset (``pipeline.py``) and a dry run or a size budget (``budget.py``) knows
the output size without quantizing. ``comfy_quant_dict`` is the one place that decides what a planned
layer's ``.comfy_quant`` says (ARCHITECTURE.md, "On-disk conventions").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from . import transforms as tfm
from .errors import LayerError
from .formats import FormatError, get_codec
from .formats.base import TensorSpec
from .metadata import build_header as build_quant_header
from .metadata import encode_comfy_quant
from .metadata import parse_header as parse_quant_header
from .plan import LayerPlan, PlanOptions
from .report import LayerRecord

log = logging.getLogger("hybridquant")
# .comfy_quant keys the converter adds itself (and the transforms, applied around the codec)
_CODEC_ONLY_DROP = ("full_precision_matrix_mult",) + tfm.KEYS


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def codec_opts(p: LayerPlan) -> dict:
    opts = {k: v for k, v in p.opts.items() if k not in _CODEC_ONLY_DROP}
    opts["name"] = p.layer
    return opts


def comfy_quant_dict(p: LayerPlan) -> dict | None:
    """The ``.comfy_quant`` dict of a planned layer (None for bitsandbytes layers)."""
    md = get_codec(p.format).metadata(**codec_opts(p))
    t = tfm.of(p.opts)
    if md is None and not t:
        return None
    # bitsandbytes layers with transforms: a .comfy_quant entry beside their own quant state
    md = dict(md) if md is not None else {"format": p.format}
    md.update(t)
    if p.opts.get("full_precision_matrix_mult"):
        md["full_precision_matrix_mult"] = True
    if get_codec(p.format).spec.storage != "exact":
        # Padded/packed storage: the logical shape goes into .comfy_quant (loaders never guess it
        # from storage; stock ComfyUI ignores the extra key).
        md["orig_shape"] = [int(p.shape[0]), int(p.shape[1])]
    return md


class OutputLayout:
    """The output file as a function of the plan: tensor specs in order, header metadata."""

    def __init__(self, plans: list[LayerPlan], input_specs: Mapping[str, TensorSpec], options: PlanOptions,
                 input_metadata: Mapping[str, str] | None = None):
        self.plans = plans
        self.specs: dict[str, TensorSpec] = {}
        self.outputs: dict[str, list[str]] = {}  # input tensor name -> output names it produces
        self.comfy_quant: dict[str, torch.Tensor] = {}
        header_layers: dict[str, dict] = {}
        for p in plans:
            if not p.quantized:
                self._add(p.name, input_specs[p.name], p.name)
                continue
            try:
                specs = get_codec(p.format).output_specs(p.shape, **codec_opts(p))
            except FormatError as e:
                raise LayerError(f"layer {p.layer}: {e}") from None
            specs.update(tfm.output_specs(p.shape, tfm.of(p.opts)))
            for suffix, spec in specs.items():
                self._add(f"{p.layer}.{suffix}", spec, p.name)
            md = comfy_quant_dict(p)
            if md is not None:
                header_layers[p.layer] = md
                if options.comfy_quant:
                    t = encode_comfy_quant(md)
                    self.comfy_quant[f"{p.layer}.comfy_quant"] = t
                    self._add(f"{p.layer}.comfy_quant", TensorSpec(torch.uint8, tuple(t.shape)), p.name)
        # An input that already holds quantized layers (copied unchanged: their dtype is not a float)
        # keeps their header entries; entries of layers we re-quantize are replaced. Other metadata
        # (modelspec.* ...) is kept as is.
        try:
            old = parse_quant_header(input_metadata)
        except FormatError as e:
            raise LayerError(f"input header: {e}") from None
        ghosts = [layer for layer in old if f"{layer}.weight" not in self.specs]
        if ghosts:  # header entries of layers the file does not have: dropped, never copied
            log.warning("input header %s lists %d layer(s) not in the file (%s); dropped from the output's header",
                        "_quantization_metadata", len(ghosts), ", ".join(ghosts[:5]))
        kept = {layer: d for layer, d in old.items() if layer not in ghosts and layer not in header_layers}
        new_layers = {**kept, **header_layers} if options.save_quant_metadata else kept
        self.metadata: dict[str, str] = build_quant_header(new_layers, input_metadata)
        self.header_layers = header_layers

    def _add(self, name: str, spec: TensorSpec, source: str) -> str:
        if name in self.specs:
            raise LayerError(f"output tensor {name!r} (from {source!r}) collides with another tensor of the input; "
                             "is the file already quantized?")
        self.specs[name] = spec
        self.outputs.setdefault(source, []).append(name)
        return name

    def nbytes(self, names) -> int:
        return sum(self.specs[n].nbytes for n in names)


def layer_records(plans: list[LayerPlan], layout: OutputLayout, input_specs: Mapping[str, TensorSpec]) -> list[LayerRecord]:
    recs = []
    for p in plans:
        recs.append(LayerRecord(name=p.name, shape=list(p.shape), dtype=p.dtype, format=p.format, reason=p.reason,
                                method=p.method if p.quantized else None, bytes_in=input_specs[p.name].nbytes,
                                bytes_out=layout.nbytes(layout.outputs.get(p.name, [])),
                                transforms=tfm.of(p.opts) or None if p.quantized else None))
    return recs
