"""Per-layer quantization metadata: the ``.comfy_quant`` tensor, the ``_quantization_metadata`` header,
and discovery of the quantized layers of a state dict / safetensors file (ours and other tools').

Conventions (ARCHITECTURE.md, "On-disk conventions")
----------------------------------------------------
- ``<layer>.comfy_quant``: 1-D uint8 tensor holding compact UTF-8 JSON of a flat dict, at least
  ``{"format": NAME}``; optional ``group_size`` (int > 0), ``per_row`` (bool),
  ``full_precision_matrix_mult`` (bool), ``orig_dtype`` (str), ``orig_shape`` (list of 2 ints). Any
  other field (written by other tools) is kept and passed through.
- Header: ``__metadata__["_quantization_metadata"]`` = JSON string
  ``{"format_version": "1.0", "layers": {"<layer>": {"format": ..., ...}}}``. Other header keys
  (``modelspec.*`` ...) are kept.
- bitsandbytes 4-bit layers carry no ``.comfy_quant``; they are recognised by
  ``<layer>.weight.quant_state.bitsandbytes__nf4`` / ``__fp4`` (uint8 JSON with ``quant_type``,
  ``blocksize``, ``dtype``, ``shape`` and, when nested, ``nested_blocksize``/``nested_dtype``/
  ``nested_offset``) and get the format names ``bnb_nf4`` / ``bnb_fp4``.
- Legacy "scaled FP8" files (older ComfyUI and other converters): a marker tensor ``<prefix>scaled_fp8``
  whose dtype is the FP8 dtype used (float32 means e4m3fn), and per layer ``<layer>.scale_weight``
  (float32, 0-dim or [1]) and optionally ``<layer>.scale_input``. The data layout is exactly
  the FP8 tensorwise layout (e5m2 when the marker is e5m2; ``formats.fp8.legacy_scaled_fp8_format``) with ``weight_scale`` / ``input_scale``
  under other names; a 2-element marker means "no fp8 matmul", recorded as
  ``full_precision_matrix_mult: true`` (what ComfyUI does). A ``scale_input`` equal to 1.0 is a
  placeholder and is left out (as current ComfyUI does). A ``.scale_weight`` without any marker is
  still read as ``float8_e4m3fn`` (the weight's dtype is then checked by ``validate_layer``).

Precedence: a layer described by both a ``.comfy_quant`` tensor and the header must agree on the format
(fields are merged, the tensor wins); a header entry whose ``<layer>.weight`` is absent is an error;
legacy names only apply to layers not described otherwise.

Public API (used by the converter, the ComfyUI loaders and the editor)
----------------------------------------------------------------------
``QUANT_METADATA_KEY = "_quantization_metadata"``; ``FORMAT_VERSION = "1.0"``.

``encode_comfy_quant(d: dict) -> Tensor``
    dict -> 1-D uint8 tensor of compact UTF-8 JSON. ``d`` must have a known ``"format"``.
``decode_comfy_quant(t: Tensor, layer: str = "?") -> dict``
    The reverse; FormatError naming ``layer`` for a non-uint8/non-1-D tensor, invalid UTF-8/JSON, a
    non-dict, a missing/unknown format or a known field of the wrong type.
``build_header(layers: dict[str, dict], base_metadata: dict | None = None) -> dict[str, str]``
    A safetensors ``__metadata__`` dict: ``base_metadata`` (str -> str) with
    ``_quantization_metadata`` replaced by ``layers`` (removed when ``layers`` is empty).
``parse_header(metadata: dict | None) -> dict[str, dict]``
    ``{layer: dict}`` from a header's ``_quantization_metadata`` ({} when absent).
``discover_layers(keys, header_metadata, get_tensor, sizes=None) -> dict[str, LayerInfo]``
    Every quantized layer of a file/state dict (``keys``: its tensor names; ``header_metadata``: its
    ``__metadata__`` or None; ``get_tensor(key) -> Tensor``: called only for the small ``.comfy_quant``,
    quant-state and ``scaled_fp8`` marker tensors). Ordered as the layers' weights appear in ``keys``.
    ``sizes`` (``{key: bytes}`` or ``key -> bytes``; e.g. from ``read_header``'s infos, or
    ``ops.state_dict.tensor_bytes(sd)``): when given, a layer whose metadata announces more logical
    elements than twice its stored weight's bytes is a FormatError (``schema.check_logical_size``), so no
    one allocates by a lying ``orig_shape`` / quant-state ``shape``. Every JSON and every metadata
    object goes through ``schema`` (depth-limited JSON, no duplicate keys, typed and bounded fields);
    a bitsandbytes quant state without its ``<layer>.weight`` is a FormatError like a header entry
    without one.
``ghost_layers(layers, keys) -> list[str]``
    The layers of a metadata listing whose ``<layer>.weight`` is not among ``keys``. Writers drop such
    header entries with a warning (convert, edit, hybridize), never copy them.
    A key ``_quantization_metadata`` (ComfyUI 0.3.75 puts the header string into state dicts) is ignored.
``LayerInfo`` (frozen dataclass): ``layer``, ``format``, ``options`` (keyword arguments for the codec:
    the metadata dict minus ``format`` and minus names that would collide with codec parameters; for
    BNB ``blocksize``/``double_quant``/``dtype``), ``tensors`` (suffix -> key in the file, e.g.
    ``{"weight": "x.weight", "weight_scale": "x.scale_weight"}``), ``meta`` (the raw dict as read:
    ``.comfy_quant``/header dict, BNB quant-state dict, or the synthesised legacy dict), ``source``
    (``"comfy_quant"``, ``"header"``, ``"bnb"`` or ``"legacy_scaled_fp8"``), ``orig_shape`` (logical
    ``(M, N)`` when the metadata says, else None), ``dropped`` (keys of the layer that carry no data
    and that a loader/converter should delete: a legacy ``scale_input`` of 1.0). ``info.comfy_quant()``
    is the dict to write back.
``load_layer_tensors(info, get_tensor) -> dict[str, Tensor]``: the layer's tensors by suffix.
``validate_layer(info, tensors, shape=None) -> None``
    ``get_codec(info.format).validate(layer, tensors, shape, **info.options)``. ``shape``: the module's
    logical shape; else ``info.orig_shape``; else, for layouts stored at the logical shape (``spec.storage == "exact"``), the
    stored weight's shape. A packed layout with no known shape is a FormatError (the logical shape is never guessed).
    Checks ``orig_shape`` against ``shape`` when both exist.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from . import schema
from . import transforms as tfm
from .formats import find_spec, format_names, get_codec
from .formats.base import FormatError
from .formats.bnb4bit import BNB_FORMATS
from .formats.fp8 import legacy_scaled_fp8_format

QUANT_METADATA_KEY = "_quantization_metadata"
FORMAT_VERSION = "1.0"
BNB_STATE_PREFIX = "weight.quant_state.bitsandbytes__"
BNB_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
LEGACY_MARKER = "scaled_fp8"
# Metadata fields never passed to codecs: ``format`` is the codec itself, the rest are the names of
# codec method parameters that a stray field from another tool would collide with.
_NOT_OPTIONS = frozenset({"format", "params", "amax", "tensors", "shape", "layer", "w", "x", "name"}) | set(tfm.KEYS)
# Tensor suffixes that belong to a quantized layer (weight, weight_scale, weight_scale_2,
# weight_scalar, input_scale, weight.absmax ...). A child module's keys never match.
_LAYER_SUFFIX = re.compile(r"^(weight|input)(_[A-Za-z0-9_]+)?(\..+)?$")


@dataclass(frozen=True)
class LayerInfo:
    layer: str
    format: str
    options: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    source: str = "comfy_quant"
    orig_shape: tuple[int, int] | None = None
    dropped: tuple[str, ...] = ()  # keys of this layer deliberately ignored (legacy 1.0 scale_input)
    # low-rank branch / rotation (``converter.transforms``): {"svd_rank": R, "rotation": {...}} or {}
    transforms: dict = field(default_factory=dict)

    def comfy_quant(self) -> dict | None:
        """The ``.comfy_quant`` dict to write for this layer (None for plain bitsandbytes layers; those
        with transforms get one beside their quant state)."""
        if self.source == "bnb":
            if not self.transforms:
                return None
            d = {"format": self.format, **self.transforms}
            if self.orig_shape is not None:
                d["orig_shape"] = list(self.orig_shape)
            return d
        return dict(self.meta)


# ---- .comfy_quant tensor -------------------------------------------------------------------------

def dumps_compact(obj) -> str:
    """The compact JSON every metadata string and ``.comfy_quant`` tensor of ours is written with."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def encode_comfy_quant(d: Mapping, check: bool = True) -> torch.Tensor:
    """dict -> 1-D uint8 tensor of its compact UTF-8 JSON. ``check=False`` skips the field checks
    (the metadata editor must be able to rewrite, and so fix, a file another tool wrote oddly)."""
    d = check_layer_dict(dict(d), "comfy_quant") if check else dict(d)
    return torch.tensor(list(dumps_compact(d).encode("utf-8")), dtype=torch.uint8)


def decode_comfy_quant(t: torch.Tensor, layer: str = "?") -> dict:
    """1-D uint8 tensor -> dict, FormatError naming the layer for anything malformed."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.ndim != 1:
        what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise FormatError(f"{layer}.comfy_quant: expected a 1-D uint8 tensor, found {what}")
    d = schema.loads(bytes(t.tolist()), f"{layer}.comfy_quant")
    return check_layer_dict(d, f"{layer}.comfy_quant")


def check_layer_dict(d, where: str) -> dict:
    """Check the known fields of a layer's metadata dict; keep unknown ones. ``where`` names it."""
    schema.check_layer_fields(d, where)
    fmt = d["format"]
    if find_spec(fmt) is None:
        raise FormatError(f"{where}: unknown quantization format {fmt!r}; known formats: {', '.join(format_names())}")
    r = d.get("svd_rank")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise FormatError(f"{where}: svd_rank must be a positive integer, found {r!r}")
    rot = d.get("rotation")
    if rot is not None:
        b = rot.get("block") if isinstance(rot, dict) else None
        if not isinstance(rot, dict) or rot.get("kind") != "hadamard" or isinstance(b, bool) \
                or not isinstance(b, int) or b < 1 or b & (b - 1):
            raise FormatError(f"{where}: rotation must be {{\"kind\": \"hadamard\", \"block\": <power of two>}}, "
                              f"found {rot!r}")
    return d


def _shape_of(value, where: str) -> tuple[int, int]:
    return schema.shape_of(value, where, "orig_shape")


# ---- header ---------------------------------------------------------------------------------------

def build_header(layers: Mapping[str, Mapping], base_metadata: Mapping | None = None) -> dict[str, str]:
    """A safetensors ``__metadata__`` with the quantization header for ``layers`` (layer -> dict)."""
    out: dict[str, str] = {}
    for k, v in (base_metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise FormatError(f"header metadata must map strings to strings, found {k!r}: {type(v).__name__}")
        out[k] = v
    out.pop(QUANT_METADATA_KEY, None)
    if layers:
        checked = {name: check_layer_dict(dict(d), f"header layer {name}") for name, d in layers.items()}
        out[QUANT_METADATA_KEY] = dumps_compact({"format_version": FORMAT_VERSION, "layers": checked})
    return out


def parse_header(metadata: Mapping | None) -> dict[str, dict]:
    """``{layer: dict}`` from ``metadata[_quantization_metadata]``; {} when there is none."""
    if not metadata or QUANT_METADATA_KEY not in metadata:
        return {}
    raw = metadata[QUANT_METADATA_KEY]
    where = f"header {QUANT_METADATA_KEY}"
    doc = schema.loads(raw, where) if isinstance(raw, (str, bytes)) else raw
    schema.check_quant_header(doc, where)
    return {name: check_layer_dict(d, f"header layer {name}") for name, d in doc["layers"].items()}


def ghost_layers(layers: Iterable[str], keys: Iterable[str]) -> list[str]:
    """The layers of a metadata listing (header ``layers``, ``.comfy_quant`` configs) whose
    ``<layer>.weight`` is not among ``keys``: metadata a writer must not carry into its output."""
    keyset = set(keys)
    return [layer for layer in layers if f"{layer}.weight" not in keyset]


# ---- discovery ------------------------------------------------------------------------------------

def discover_layers(keys: Iterable[str], header_metadata: Mapping | None,
                    get_tensor: Callable[[str], torch.Tensor],
                    sizes: Mapping[str, int] | Callable[[str], int] | None = None) -> dict[str, LayerInfo]:
    """Every quantized layer of a file / state dict; see the module docstring. ``sizes`` (the byte
    size of each tensor, e.g. from the file's header) lets the metadata's logical shapes be checked
    against the stored weights (``schema.check_logical_size``) before anyone allocates by them."""
    keys = [k for k in keys if k != QUANT_METADATA_KEY]
    keyset = set(keys)
    found: dict[str, LayerInfo] = {}

    header = parse_header(header_metadata)
    from_tensor = {k[: -len(".comfy_quant")]: decode_comfy_quant(get_tensor(k), k[: -len(".comfy_quant")])
                   for k in keys if k.endswith(".comfy_quant")}
    bnb_extra: dict[str, dict] = {}  # bitsandbytes layers' entries (their transforms)
    for layer in list(from_tensor) + [l for l in header if l not in from_tensor]:
        meta, source = from_tensor.get(layer), "comfy_quant"
        if meta is None:
            meta, source = dict(header[layer]), "header"
        elif layer in header:
            if header[layer]["format"] != meta["format"]:
                raise FormatError(f"{layer}: header says format {header[layer]['format']!r} but "
                                  f"{layer}.comfy_quant says {meta['format']!r}")
            meta = {**header[layer], **meta}
        if f"{layer}.weight" not in keyset:
            raise FormatError(f"{layer}: listed as quantized ({source}) but '{layer}.weight' is not in the file")
        if meta["format"] in BNB_FORMATS.values():
            bnb_extra[layer] = meta
            continue
        found[layer] = _info(layer, meta, source, _layer_tensors(layer, keys))
        _check_size(found[layer], sizes)

    for k in keys:
        for qt, fmt in BNB_FORMATS.items():
            if k.endswith("." + BNB_STATE_PREFIX + qt):
                layer = k[: -len(BNB_STATE_PREFIX + qt) - 1]
                if layer in found:
                    raise FormatError(f"{layer}: has bitsandbytes quant state and {found[layer].source} metadata")
                info = _bnb_info(layer, qt, fmt, k, keyset, get_tensor)
                extra = bnb_extra.pop(layer, None)
                if extra is not None:
                    if extra["format"] != fmt:
                        raise FormatError(f"{layer}: .comfy_quant/header says {extra['format']!r} but the "
                                          f"bitsandbytes quant state is {fmt!r}")
                    info = _with_transforms(info, extra, keyset)
                found[layer] = info
                _check_size(info, sizes)
    if bnb_extra:
        layer = next(iter(bnb_extra))
        raise FormatError(f"{layer}: metadata says format {bnb_extra[layer]['format']!r} but the file has no "
                          f"bitsandbytes quant state for it")

    _discover_legacy(keys, keyset, found, get_tensor)
    order = {k[: -len(".weight")]: i for i, k in enumerate(keys) if k.endswith(".weight")}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], len(order))))


def _check_size(info: LayerInfo, sizes) -> None:
    if sizes is None:
        return
    key = info.tensors.get("weight", f"{info.layer}.weight")
    nbytes = sizes(key) if callable(sizes) else sizes.get(key)
    shape = info.orig_shape if info.source != "bnb" else tuple(info.meta["shape"])
    schema.check_logical_size(shape, nbytes, f"{info.layer}: {info.source} metadata")


def _layer_tensors(layer: str, keys: Iterable[str]) -> dict[str, str]:
    p = layer + "."
    return {k[len(p):]: k for k in keys if k.startswith(p) and _LAYER_SUFFIX.match(k[len(p):])}


def _info(layer: str, meta: dict, source: str, tensors: dict[str, str]) -> LayerInfo:
    opts = {k: v for k, v in meta.items() if k not in _NOT_OPTIONS}
    shape = _shape_of(meta["orig_shape"], layer) if "orig_shape" in meta else None
    t = tfm.of(meta)
    if t.get("svd_rank"):
        tensors = {**tensors, **{s: f"{layer}.{s}" for s in tfm.TENSORS}}
    return LayerInfo(layer, meta["format"], opts, tensors, meta, source, shape, transforms=t)


def _with_transforms(info: LayerInfo, extra: dict, keyset) -> LayerInfo:
    """A bitsandbytes layer plus the transforms of its .comfy_quant / header entry."""
    import dataclasses

    t = tfm.of(extra)
    tensors = dict(info.tensors)
    if t.get("svd_rank"):
        tensors.update({s: f"{info.layer}.{s}" for s in tfm.TENSORS})
    if "orig_shape" in extra and info.orig_shape is not None and tuple(extra["orig_shape"]) != tuple(info.orig_shape):
        raise FormatError(f"{info.layer}: .comfy_quant orig_shape {extra['orig_shape']} does not match the "
                          f"bitsandbytes quant state shape {list(info.orig_shape)}")
    return dataclasses.replace(info, tensors=tensors, transforms=t)


def _bnb_info(layer, qt, fmt, state_key, keyset, get_tensor) -> LayerInfo:
    if f"{layer}.weight" not in keyset:
        raise FormatError(f"{layer}: has a bitsandbytes quant state '{state_key}' but no '{layer}.weight'")
    t = get_tensor(state_key)
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise FormatError(f"{layer}: bitsandbytes quant state '{state_key}' must be a 1-D uint8 tensor, found {what}")
    state = schema.loads(bytes(t.tolist()), layer, what=f"bitsandbytes quant state '{state_key}'")
    schema.check_quant_state(state, layer, qt)
    shape = state["shape"]
    tensors = {s: f"{layer}.{s}" for s in BNB_SUFFIXES if f"{layer}.{s}" in keyset}
    tensors[BNB_STATE_PREFIX + qt] = state_key
    opts = {"blocksize": state["blocksize"], "double_quant": "nested_blocksize" in state, "dtype": state["dtype"]}
    orig = (shape[0], shape[1]) if len(shape) == 2 else None
    return LayerInfo(layer, fmt, opts, tensors, state, "bnb", orig)


def _discover_legacy(keys, keyset, found: dict, get_tensor) -> None:
    markers = {}  # prefix -> marker tensor
    for k in keys:
        if k == LEGACY_MARKER or k.endswith("." + LEGACY_MARKER):
            markers[k[: -len(LEGACY_MARKER)]] = get_tensor(k)
    for k in keys:
        if not k.endswith(".scale_weight"):
            continue
        layer = k[: -len(".scale_weight")]
        if layer in found:
            continue  # described by .comfy_quant / header; those names win (as in ComfyUI)
        if f"{layer}.weight" not in keyset:
            raise FormatError(f"{layer}: has legacy '{k}' but no '{layer}.weight'")
        prefix = max((p for p in markers if k.startswith(p)), key=len, default=None)
        marker = markers.get(prefix) if prefix is not None else None
        fmt = legacy_scaled_fp8_format(marker.dtype if marker is not None else None)
        meta = {"format": fmt}
        if marker is not None and marker.numel() == 2:
            meta["full_precision_matrix_mult"] = True
        tensors = {"weight": f"{layer}.weight", "weight_scale": k}
        si = f"{layer}.scale_input"
        # A scale_input of exactly 1.0 is the placeholder older tools wrote for "no static input
        # scale"; current ComfyUI drops it too, so activations are not clamped to ±448 unscaled.
        dropped = ()
        if si in keyset:
            if _is_one(get_tensor(si)):
                dropped = (si,)
            else:
                tensors["input_scale"] = si
        found[layer] = LayerInfo(layer, fmt, {k2: v for k2, v in meta.items() if k2 != "format"},
                                 tensors, meta, "legacy_scaled_fp8", None, dropped)


def _is_one(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and t.numel() == 1 and float(t.reshape(())) == 1.0


# ---- tensors and validation -----------------------------------------------------------------------

def load_layer_tensors(info: LayerInfo, get_tensor: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer's tensors keyed by suffix (legacy names already mapped to the codec's)."""
    return {suffix: get_tensor(key) for suffix, key in info.tensors.items()}


def validate_layer(info: LayerInfo, tensors: Mapping[str, torch.Tensor], shape=None) -> None:
    """Validate a layer's tensors with its codec; FormatError naming the layer and the problem."""
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if info.orig_shape is not None and tuple(info.orig_shape) != shape:
            raise FormatError(f"{info.layer}: metadata orig_shape {tuple(info.orig_shape)} does not match the "
                              f"layer's shape {shape}")
    elif info.orig_shape is not None:
        shape = tuple(info.orig_shape)
    elif get_codec(info.format).spec.storage == "exact" and "weight" in tensors and tensors["weight"].ndim == 2:
        shape = tuple(tensors["weight"].shape)
    else:
        raise FormatError(f"{info.layer}: logical shape of this {info.format} layer is unknown "
                          "(no orig_shape in its metadata and none given)")
    get_codec(info.format).validate(info.layer, tensors, shape, **info.options)
    if info.transforms:
        validate_transforms(info, tensors, shape)


def validate_transforms(info: LayerInfo, tensors: Mapping[str, torch.Tensor], shape) -> None:
    """Check a layer's low-rank tensors and rotation against its logical ``shape``; FormatError naming it."""
    from .formats.base import require

    try:
        t = tfm.resolve(info.transforms, shape, info.layer)
    except ValueError as e:
        raise FormatError(str(e)) from None
    if "rotation" in info.transforms and info.transforms["rotation"].get("block") is None:
        raise FormatError(f"{info.layer}: rotation has no block size")
    for suffix, spec in tfm.output_specs(shape, t).items():
        require(info.layer, tensors, suffix, dtype=spec.dtype, shape=spec.shape)
