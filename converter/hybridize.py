"""Turning an MXFP8 file into a Hybrid MXFP8 file (``--make-hybrid-mxfp8`` [``--tensor-scales FILE``]).

Hybrid MXFP8 (``formats/hybrid_mxfp8.py`` holds the format spec) is MXFP8 plus one tensorwise float32
``.weight_scalar`` per layer, so GPUs without MX matmuls (Ada, Hopper) can run the layer as a
tensorwise FP8 matmul after re-expressing the blocks relative to that scalar.

What this does, per layer whose format is ``mxfp8`` (from its ``.comfy_quant`` tensor or its
``_quantization_metadata`` header entry):

- every MXFP8 tensor (``.weight``, ``.weight_scale``, anything else of the layer) is copied byte for
  byte; ``.weight_scalar`` (float32 ``[]``) is added right after ``.weight``;
- the format string becomes ``hybrid_mxfp8`` wherever the layer states it (tensor and/or header);
  its other ``.comfy_quant`` keys and all other header metadata are kept;
- the scalar is ``formats.hybrid_mxfp8.mxfp8_to_hybrid(tensors, shape, scalar)``'s: with
  ``--tensor-scales FILE`` the ``.weight_scale`` (or legacy ``.scale_weight``) of the same layer in a
  tensorwise FP8 file (``float8_e4m3fn`` weight, one-element scale), otherwise computed by the codec
  from the block scales.

All other layers and tensors (other formats, already-hybrid layers, biases, norms) are copied
unchanged. The output is a new file written atomically (``rewrite.py``); output == input is refused.

Matching ``--tensor-scales`` layers: by exact layer name, else by a unique name that differs only by a
leading prefix (``model.diffusion_model.x`` ↔ ``x``), so a diffusion-model file's scales fit a full
checkpoint and vice versa. Decisions on partial matches (documented for the CLI help):

- no MXFP8 layer in the input -> ``NoMatchingLayersError`` (the message says if the file is
  already hybrid);
- the scales file matches NO MXFP8 layer -> ``NoMatchingLayersError``;
- it matches SOME: the others get the computed scalar and a warning names them (in the report's
  ``warnings`` and on the ``hybridquant`` logger); ``strict_scales=True`` makes that an error instead;
- a matched layer whose scale is not one element (rowwise/blockwise FP8) counts as unmatched, with
  the reason in the warning;
- a matched layer with a different weight shape (the scales come from another model), or a scale
  that is not finite and positive -> ``LayerError`` naming both files and the layer.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import torch

from .errors import LayerError, NoMatchingLayersError, OutputFileError
from .formats import FormatError, get_codec
from .formats.base import TensorSpec, round_up
from .formats.fp8 import FP8Tensorwise
from .formats.hybrid_mxfp8 import MXFP8, HybridMXFP8
from .metadata import QUANT_METADATA_KEY, dumps_compact
from .rewrite import (
    COMFY_QUANT_SUFFIX,
    CancelFn,
    ProgressFn,
    encode_comfy_quant,
    read_layer_configs,
    read_quant_configs,
    rewrite_file,
)
from .safetensors_io import SafetensorsReader, same_file
from .safetensors_writer import check_output_path

log = logging.getLogger("hybridquant.converter.hybridize")

SOURCE_FORMAT = MXFP8.spec.name
TARGET_FORMAT = HybridMXFP8.spec.name
TENSORWISE_FORMAT = FP8Tensorwise.spec.name  # what --tensor-scales files hold
SCALE_NAMES = ("weight_scale", "scale_weight")  # current and legacy scaled-FP8 spelling
_MX_BLOCK = 32


def _logical_shape(path: str, L: str, cfg: Mapping, storage: tuple[int, ...]) -> tuple[int, int]:
    """``orig_shape`` when the layer states it, else the (padded) storage shape.

    Without ``orig_shape`` the padding is indistinguishable from data; that is harmless here: padding
    blocks are all-zero (E8M0 code 0) and contribute nothing to a scalar derived from block scales."""
    shape = cfg.get("orig_shape")
    if shape is None:
        return int(storage[0]), int(storage[1])
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise LayerError(f"{path}: layer {L}: orig_shape {shape!r} is not a 2-D shape")
    return int(shape[0]), int(shape[1])


def _match_name(L: str, names: Mapping[str, object]) -> str | None:
    if L in names:
        return L
    cands = [s for s in names if L.endswith("." + s) or s.endswith("." + L)]
    return cands[0] if len(cands) == 1 else None


def load_tensor_scales(path, layers: Mapping[str, tuple[tuple[int, int], tuple[int, int], bool]]
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the tensorwise FP8 scales of ``path`` for ``layers`` = ``{L: (logical shape, storage shape,
    shape_known)}``. Returns ``({L: float32 0-dim scalar}, {L: why it has none})``."""
    path = os.fspath(path)
    with SafetensorsReader(path) as r:
        # Tensorwise-FP8 candidates of the scales file: an e4m3fn 2-D weight and a scale tensor.
        fp8: dict[str, tuple] = {}
        cfgs = read_layer_configs(r)
        for name, info in r.infos.items():
            if not name.endswith(".weight") or info.dtype != torch.float8_e4m3fn or len(info.shape) != 2:
                continue
            S = name[: -len(".weight")]
            scale = next((f"{S}.{s}" for s in SCALE_NAMES if f"{S}.{s}" in r.infos), None)
            if scale is not None:
                fp8[S] = (info, scale)
        found: dict[str, torch.Tensor] = {}
        why: dict[str, str] = {}
        for L, (shape, storage, known) in layers.items():
            S = _match_name(L, fp8)
            if S is None:
                other = _match_name(L, cfgs)
                why[L] = ("no tensorwise FP8 layer of that name" if other is None
                          else f"its format there is {cfgs[other].get('format')!r}, not tensorwise FP8")
                continue
            winfo, scale_name = fp8[S]
            fmt = cfgs.get(S, {}).get("format", TENSORWISE_FORMAT)
            sinfo = r.infos[scale_name]
            if fmt != TENSORWISE_FORMAT or sinfo.numel != 1:
                why[L] = f"{scale_name} is {fmt} with scale shape {list(sinfo.shape)}, not one tensorwise scale"
                continue
            ws = tuple(winfo.shape)
            ok = ws == tuple(shape) if known else (round_up(ws[0], _MX_BLOCK), round_up(ws[1], _MX_BLOCK)) == tuple(storage)
            if not ok:
                raise LayerError(f"{path}: layer {S}: weight shape {list(ws)} does not fit MXFP8 layer {L} "
                                 f"(logical {list(shape)}, stored {list(storage)}); is --tensor-scales from another model?")
            v = r.read(scale_name).to(torch.float32).reshape(())
            if not bool(torch.isfinite(v)) or float(v) <= 0:
                raise LayerError(f"{path}: {scale_name} = {float(v)}: a tensorwise scale must be finite and positive")
            found[L] = v
    return found, why


def make_hybrid_mxfp8(input, output, tensor_scales=None, overwrite: bool = False, *, strict_scales: bool = False,
                      progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> dict:
    """Convert every MXFP8 layer of ``input`` to Hybrid MXFP8 in a new file ``output``.

    See the module docstring for the policy. Returns a JSON-serializable report with
    ``layers_converted``, ``scalar_sources`` (``{"imported": n, "computed": n}``), ``computed_layers``
    (the fallbacks when ``tensor_scales`` was given), ``scalars`` (``{layer: value}``) and ``warnings``."""
    from .formats.hybrid_mxfp8 import mxfp8_to_hybrid  # the format's own derivation of the scalar

    t0 = time.perf_counter()
    input, output = os.fspath(input), os.fspath(output)
    mx = get_codec(SOURCE_FORMAT)
    with SafetensorsReader(input) as reader:
        check_output_path(input, output, overwrite)
        if tensor_scales is not None and os.path.exists(output) and same_file(tensor_scales, output):
            raise OutputFileError(f"{output}: output equals the --tensor-scales file; write to a new file")
        cfgs = read_quant_configs(reader, input)
        tensor_cfgs, qm, header_layers, ghost_warnings = cfgs.tensors, cfgs.header, cfgs.header_layers, cfgs.warnings
        formats = {L: cfgs.format_of(L) for L in cfgs.layers()}
        layers = [L for L, f in formats.items() if f == SOURCE_FORMAT]
        already = [L for L, f in formats.items() if f == TARGET_FORMAT]
        if not layers:
            seen = sorted({str(f) for f in formats.values()})
            hint = f"; {len(already)} layers are already {TARGET_FORMAT}" if already else ""
            raise NoMatchingLayersError(f"{input}: no MXFP8 layers to make hybrid (layer formats found: "
                                        f"{', '.join(seen) if seen else 'none'}){hint}")

        # Check every layer from the header alone before any data is read or written.
        shapes: dict[str, tuple[tuple[int, int], tuple[int, int], bool]] = {}
        for L in layers:
            cfg = tensor_cfgs.get(L) or header_layers.get(L, {})
            w = reader.infos.get(f"{L}.weight")
            if w is None or len(w.shape) != 2:
                raise LayerError(f"{input}: layer {L} is declared mxfp8 but has no 2-D tensor '{L}.weight'")
            if f"{L}.weight_scalar" in reader.infos:
                raise LayerError(f"{input}: layer {L} is declared mxfp8 but already has '{L}.weight_scalar'")
            shape = _logical_shape(input, L, cfg, w.shape)
            spec = mx.output_specs(shape)
            if w.dtype != torch.float8_e4m3fn or tuple(w.shape) != spec["weight"].shape:
                raise LayerError(f"{input}: {L}.weight: expected float8_e4m3fn {list(spec['weight'].shape)} for an "
                                 f"MXFP8 layer of shape {list(shape)}, found {w.dtype} {list(w.shape)}")
            s = reader.infos.get(f"{L}.weight_scale")
            if s is None or tuple(s.shape) != spec["weight_scale"].shape:
                found = "none" if s is None else f"{s.dtype} {list(s.shape)}"
                raise LayerError(f"{input}: {L}.weight_scale: expected blocked E8M0 scales "
                                 f"{list(spec['weight_scale'].shape)}, found {found}")
            shapes[L] = (shape, tuple(w.shape), cfg.get("orig_shape") is not None)

        imported: dict[str, torch.Tensor] = {}
        warnings: list[str] = list(ghost_warnings)
        computed_fallback: list[str] = []
        if tensor_scales is not None:
            imported, why = load_tensor_scales(tensor_scales, shapes)
            if not imported:
                sample = "; ".join(f"{L}: {r}" for L, r in list(why.items())[:3])
                raise NoMatchingLayersError(f"--tensor-scales {tensor_scales}: none of the {len(layers)} MXFP8 layers of "
                                            f"{input} has a tensorwise FP8 scale there ({sample})")
            computed_fallback = [L for L in layers if L not in imported]
            if computed_fallback:
                shown = computed_fallback[:20]  # the full list is in the report's computed_layers
                detail = "; ".join(f"{L} ({why[L]})" for L in shown)
                if len(computed_fallback) > len(shown):
                    detail += f"; ... and {len(computed_fallback) - len(shown)} more"
                if strict_scales:
                    raise NoMatchingLayersError(f"--tensor-scales {tensor_scales}: no usable scale for "
                                                f"{len(computed_fallback)} of {len(layers)} MXFP8 layers: {detail}")
                msg = (f"--tensor-scales {tensor_scales}: no usable scale for {len(computed_fallback)} of {len(layers)} "
                       f"MXFP8 layers; their scalar is computed from the block scales: {detail}")
                warnings.append(msg)
                log.warning(msg)

        scalars: dict[str, float] = {}
        by_weight = {f"{L}.weight": L for L in layers}

        def on_read(name: str, t: torch.Tensor):
            L = by_weight.get(name)
            if L is None:
                return None
            shape = shapes[L][0]
            tensors = {"weight": t, "weight_scale": reader.read(f"{L}.weight_scale")}
            try:
                hybrid = mxfp8_to_hybrid(tensors, shape, scalar=imported.get(L), layer=L)  # validates the layer
            except FormatError as e:
                raise LayerError(f"{input}: {e}") from None
            v = hybrid["weight_scalar"]
            if v.numel() != 1 or not bool(torch.isfinite(v).all()):
                raise LayerError(f"{input}: layer {L}: derived scalar {v} is not one finite value")
            v = v.to(torch.float32).reshape(())
            scalars[L] = float(v)
            return {f"{L}.weight_scalar": v}

        replace = {}
        for L in layers:
            if L in tensor_cfgs:
                replace[L + COMFY_QUANT_SUFFIX] = encode_comfy_quant(dict(tensor_cfgs[L], format=TARGET_FORMAT))
        metadata = dict(reader.metadata)
        if qm is not None:
            new_layers = dict(header_layers)
            for L in layers:
                if L in new_layers:
                    new_layers[L] = dict(new_layers[L], format=TARGET_FORMAT)
            metadata[QUANT_METADATA_KEY] = dumps_compact(dict(qm, layers=new_layers))
        insert_after = {f"{L}.weight": {f"{L}.weight_scalar": TensorSpec(torch.float32, ())} for L in layers}
        nbytes = rewrite_file(reader, output, replace=replace, insert_after=insert_after, on_read=on_read,
                              metadata=metadata, overwrite=overwrite, progress=progress, cancel=cancel)
    return {
        "mode": "make_hybrid_mxfp8",
        "input": input,
        "output": os.path.abspath(output),
        "tensor_scales": os.fspath(tensor_scales) if tensor_scales is not None else None,
        "layers_converted": len(layers),
        "layers_already_hybrid": len(already),
        "scalar_sources": {"imported": len(imported), "computed": len(layers) - len(imported)},
        "computed_layers": computed_fallback,
        "scalars": scalars,
        "warnings": warnings,
        "bytes_written": nbytes,
        "seconds": round(time.perf_counter() - t0, 3),
    }


__all__ = ["make_hybrid_mxfp8", "load_tensor_scales"]
