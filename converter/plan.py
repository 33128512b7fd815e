"""Layer selection: which tensor becomes which format, and why.

Only 2-D ``<layer>.weight`` tensors are candidates; everything else is copied unchanged. For each
candidate the first rule that applies decides (the reason is recorded for ``--dry-run``/reports):

1. ``--custom-layers REGEX`` matches -> ``--custom-type`` (with ``--custom-scaling-mode``,
   ``--custom-block-size``, ``--custom-simple``; ``--custom-heur`` may still keep it). Custom layers win
   over every exclusion, as users of the original tool expect.
2. ``--layer-config`` has a matching regex -> that entry's format/options (``"skip"`` keeps the layer).
   Several matches: the MOST SPECIFIC wins = the pattern with the most literal (non-regex) characters,
   then the longer pattern, then the later entry in the file.
3. Embedding tables (always), ``--exclude-layers REGEX`` and model presets -> kept in high precision.
4. ``--heur`` -> kept when the shape suits the format badly (``presets.heuristic_reason``).
5. Otherwise the layer-config ``_default`` entry if given, else the primary mode.

Whatever rule chose a format, a layer whose shape ComfyUI's model detection reads
(``converter.detection``) is kept in high precision when that format stores a different shape
(packed/padded 4-bit, 5/6-bit): stock loaders would infer the wrong model config from it. Likewise a
layer whose shape the format cannot store at all (``Codec.shape_reason``: ConvRot formats need
in_features a multiple of their rotation group) is kept, with the format's reason.

All regexes use ``re.search`` on the layer name (the tensor name without ``.weight``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .detection import detection_reason
from .errors import OptionError
from .formats import FormatError, registry
from .presets import EMBEDDING_TABLES, PRESETS, heuristic_reason

SCALING_MODES = ("tensor", "row", "block")
UNSTORABLE = "unstorable shape:"  # the start of a plan's reason for a layer its format cannot store
KEEP_WORDS = ("skip", "keep", "none", "high_precision", "full")


@dataclass
class PlanOptions:
    """Everything that decides the per-layer plan. Field names follow the CLI flags."""

    mode: str = "fp8"
    scaling_mode: str = "tensor"
    block_size: int | None = None
    bnb_quant_type: str = "nf4"
    bnb_blocksize: int = 64
    bnb_double_quant: bool = False
    custom_layers: str | None = None
    custom_type: str | None = None
    custom_block_size: int | None = None
    custom_scaling_mode: str | None = None
    custom_simple: bool = False
    custom_heur: bool = False
    exclude_layers: str | None = None
    layer_config: Any = None  # path to a JSON file, or an already-parsed dict
    presets: tuple[str, ...] = ()
    heur: bool = False
    method: str = "rtn"  # rounding method (converter.rounding.METHODS); "rtn" == --simple
    comfy_quant: bool = True
    save_quant_metadata: bool = True
    full_precision_matrix_mult: bool = False
    input_scale: bool = False
    svd_rank: int | None = None  # --svd-rank: low-rank bf16 branch beside every quantized layer
    rotate: str | None = None  # --rotate hadamard[:B]
    target_size: int | None = None  # --target-size in bytes (converter.budget)
    target_bpw: float | None = None  # --target-bpw


@dataclass
class LayerPlan:
    """The decision for one tensor of the input file."""

    name: str  # tensor name in the input
    shape: tuple[int, ...]
    dtype: str  # input dtype, e.g. "bfloat16"
    layer: str | None = None  # layer prefix for quantized tensors
    format: str | None = None  # None: copied unchanged
    opts: dict = field(default_factory=dict)
    method: str = "rtn"
    reason: str = ""

    @property
    def quantized(self) -> bool:
        return self.format is not None


def compile_regex(pattern: str | None, flag: str) -> re.Pattern | None:
    if pattern is None or pattern == "":
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise OptionError(f"{flag}: invalid regex {pattern!r}: {e}") from None


def primary_modes() -> tuple[str, ...]:
    """The CLI primary modes (format families), from the registry."""
    return registry.families()


def custom_types() -> tuple[str, ...]:
    """Families usable for --custom-layers (8-bit / MX / NV layers inside any file)."""
    return tuple(f for f in registry.families() if any(s.custom and s.variants for s in registry.family_specs(f)))


def resolve_format(kind: str, scaling_mode: str | None = "tensor", block_size: int | None = None, *,
                   bnb_quant_type: str = "nf4", bnb_blocksize: int = 64, bnb_double_quant: bool = False,
                   where: str = "") -> tuple[str, dict]:
    """Map a user-level choice to (format name, codec opts), from the registry.

    ``kind`` is a family (CLI mode: ``fp8``, ``int8``, ``bnb4bit`` ...), a format name, or a variant key
    that names one format by itself (``nf4``). Inside a family the variant is the one whose key is
    ``scaling_mode`` (FP8/INT8), else ``bnb_quant_type`` (bitsandbytes), else the family's single
    key-less choice. A variant's ``group_size`` default yields to ``block_size``; bitsandbytes variants
    take ``bnb_blocksize``/``bnb_double_quant``. The codec validates the options.
    """
    scaling_mode = scaling_mode or "tensor"
    if scaling_mode in ("block2d", "block3d"):
        scaling_mode = "block"
    if scaling_mode not in SCALING_MODES:
        raise OptionError(f"{where}unknown scaling mode {scaling_mode!r}; choose from {', '.join(SCALING_MODES)}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0):
        raise OptionError(f"{where}block size must be a positive integer, got {block_size!r}")
    keys = (scaling_mode, bnb_quant_type)
    spec = registry.find_spec(kind)
    if spec is not None:  # a format name: its variant for the scaling mode, else its first one
        variant = next((v for v in spec.variants if v.key in keys), spec.variants[0] if spec.variants else None)
    else:
        by_key = [(s, v) for s, v in registry.choices() if v.key and v.key == kind and v.key not in SCALING_MODES]
        if len(by_key) == 1:
            spec, variant = by_key[0]
        elif kind in registry.families():
            members = [(s, v) for s in registry.family_specs(kind) for v in s.variants]
            pick = next(((s, v) for k in keys for s, v in members if v.key == k), None)
            pick = pick or next(((s, v) for s, v in members if v.key == ""), None)
            if pick is None:
                offered = ", ".join(v.key for _, v in members)
                raise OptionError(f"{where}{kind} has no variant {scaling_mode!r} / {bnb_quant_type!r}; choose from {offered}")
            spec, variant = pick
        else:
            known = sorted(set(registry.families()) | set(registry.format_names()))
            raise OptionError(f"{where}unknown format {kind!r}; known: {', '.join(known)}")
    opts = dict(variant.opts) if variant is not None else {}
    if block_size is not None and "group_size" in opts:
        opts["group_size"] = block_size
    if "blocksize" in opts:
        opts["blocksize"], opts["double_quant"] = bnb_blocksize, bool(bnb_double_quant)
    try:
        registry.get_codec(spec.name).output_specs((256, 256), **opts)
    except FormatError as e:
        raise OptionError(f"{where}{spec.label}: {e}") from None
    return spec.name, opts


def _literal_len(pattern: str) -> int:
    """Number of literal characters in a regex: the specificity measure of --layer-config."""
    stripped = re.sub(r"\\.", "x", pattern)  # an escaped char is one literal
    return len(re.sub(r"[\^\$\.\*\+\?\(\)\[\]\{\}\|]", "", stripped))


_LC_KEYS = {"format", "type", "scaling_mode", "block_size", "group_size", "per_row", "blocksize",
            "double_quant", "quant_type", "simple", "method", "full_precision_matrix_mult", "comment",
            "svd_rank", "rotate", "rotation"}


def parse_transforms(svd_rank, rotate, where: str) -> dict:
    """``--svd-rank`` / ``--rotate`` (or a layer-config entry's ``svd_rank`` / ``rotate``) -> the requested
    transforms (``converter.transforms``); the rotation block stays None for "each layer's default"."""
    from . import rotation

    out = {}
    if svd_rank not in (None, 0):
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 0:
            raise OptionError(f"{where}svd_rank must be a non-negative integer, got {svd_rank!r}")
        out["svd_rank"] = svd_rank
    if isinstance(rotate, Mapping):
        rotate = f"{rotate.get('kind')}:{rotate['block']}" if rotate.get("block") else rotate.get("kind")
    try:
        rot = rotation.parse(rotate)
    except ValueError as e:
        raise OptionError(f"{where}{e}") from None
    if rot is not None:
        out["rotation"] = rot
    return out


@dataclass
class _LCEntry:
    pattern: str
    regex: re.Pattern | None
    fmt: str | None  # None -> keep in high precision
    opts: dict
    method: str | None
    fpmm: bool | None
    order: int
    transforms: dict | None = None  # None: the run's --svd-rank/--rotate


def load_layer_config(cfg: Any, options: PlanOptions) -> tuple[list[_LCEntry], _LCEntry | None]:
    """Parse ``--layer-config`` (path or dict). Returns (regex entries, _default entry)."""
    src = "--layer-config"
    if isinstance(cfg, (str, os.PathLike)):
        src = f"--layer-config {os.fspath(cfg)}"
        try:
            with open(cfg, "rb") as f:
                raw = f.read(64 << 20)  # a layer config is a few KB; a huge file is not one
        except FileNotFoundError:
            raise OptionError(f"{src}: file not found") from None
        except OSError as e:
            raise OptionError(f"{src}: cannot read ({e})") from None
        from .schema import loads

        cfg = loads(raw, src, error=OptionError)  # depth-limited, no duplicate keys
    if not isinstance(cfg, Mapping):
        raise OptionError(f"{src}: must be a JSON object mapping regex -> {{\"format\": ...}}")
    entries, default = [], None
    for i, (pattern, spec) in enumerate(cfg.items()):
        where = f"{src}: entry {pattern!r}: "
        if isinstance(spec, str):
            spec = {"format": spec}
        if not isinstance(spec, Mapping):
            raise OptionError(f"{where}value must be an object like {{\"format\": \"fp8\"}} or a format name")
        unknown = set(spec) - _LC_KEYS
        if unknown:
            raise OptionError(f"{where}unknown keys {sorted(unknown)}; allowed: {sorted(_LC_KEYS)}")
        kind = spec.get("format", spec.get("type"))
        if kind is None:
            raise OptionError(f"{where}missing \"format\"")
        method = None
        if "method" in spec:
            method = str(spec["method"])
        elif spec.get("simple"):
            method = "rtn"
        fmt, opts = None, {}
        if str(kind).lower() not in KEEP_WORDS:
            fmt, opts = resolve_format(
                str(kind), spec.get("scaling_mode", options.scaling_mode),
                spec.get("block_size", spec.get("group_size", options.block_size)),
                bnb_quant_type=spec.get("quant_type", options.bnb_quant_type),
                bnb_blocksize=spec.get("blocksize", options.bnb_blocksize),
                bnb_double_quant=spec.get("double_quant", options.bnb_double_quant), where=where)
            if spec.get("per_row") and any("per_row" in v.opts for v in registry.get_spec(fmt).variants):
                opts["per_row"] = True
        regex = None if pattern == "_default" else compile_regex(pattern, f"{src} (entry {pattern!r})")
        tf = None
        if any(k in spec for k in ("svd_rank", "rotate", "rotation")):
            tf = parse_transforms(spec.get("svd_rank"), spec.get("rotate", spec.get("rotation")), where)
        e = _LCEntry(pattern, regex, fmt, opts, method, spec.get("full_precision_matrix_mult"), i, tf)
        if pattern == "_default":
            default = e
        else:
            entries.append(e)
    return entries, default


def layer_transforms(requested: Mapping, shape: tuple[int, ...]) -> dict:
    """The transforms a layer of ``shape`` gets from the requested ones: a rank above half the layer's
    smaller side is dropped (the branch would cost more than the weight), a rotation block that does not
    divide in_features falls back to the layer's default block, and a block of 1 means no rotation."""
    from . import rotation

    out: dict = {}
    m, n = int(shape[0]), int(shape[1])
    r = requested.get("svd_rank")
    if r and r <= min(m, n) // 2:
        out["svd_rank"] = int(r)
    rot = requested.get("rotation")
    if rot is not None:
        b = rot.get("block") or rotation.default_block(n)
        if n % b:
            b = rotation.default_block(n)
        if b >= 2:
            out["rotation"] = {"kind": rot["kind"], "block": int(b)}
    return out


def layer_name(tensor_name: str) -> str | None:
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else None


class Planner:
    """Builds ``LayerPlan``s for tensors; construct once per conversion (compiles every regex)."""

    def __init__(self, options: PlanOptions):
        self.o = options
        from .rounding import METHODS

        if options.mode not in primary_modes() and registry.find_spec(options.mode) is None:  # family or format name
            raise OptionError(f"unknown primary mode {options.mode!r}; choose from {', '.join(primary_modes())} "
                              f"or a format name ({', '.join(registry.format_names())})")
        if options.method not in METHODS:
            raise OptionError(f"unknown rounding method {options.method!r}; known: {', '.join(METHODS)}")
        self.primary = resolve_format(options.mode, options.scaling_mode, options.block_size,
                                      bnb_quant_type=options.bnb_quant_type, bnb_blocksize=options.bnb_blocksize,
                                      bnb_double_quant=options.bnb_double_quant, where="")
        self.custom_re = compile_regex(options.custom_layers, "--custom-layers")
        self.custom = None
        if self.custom_re is not None:
            if not options.custom_type:
                raise OptionError(f"--custom-layers needs --custom-type {{{','.join(custom_types())}}}")
            if options.custom_type not in custom_types():
                raise OptionError(f"--custom-type: unknown type {options.custom_type!r}; choose from {', '.join(custom_types())}")
            self.custom = resolve_format(options.custom_type, options.custom_scaling_mode or options.scaling_mode,
                                         options.custom_block_size or options.block_size, where="--custom-type: ")
        elif options.custom_type and options.custom_layers is None:
            raise OptionError("--custom-type needs --custom-layers REGEX")
        self.exclude_re = compile_regex(options.exclude_layers, "--exclude-layers")
        unknown = [p for p in options.presets if p not in PRESETS]
        if unknown:
            raise OptionError(f"unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
        self.preset_res = [(p, PRESETS[p].matcher()) for p in options.presets]
        self.embed_re = re.compile(EMBEDDING_TABLES)
        self.transforms = parse_transforms(options.svd_rank, options.rotate, "")
        self.lc_entries, self.lc_default = ([], None)
        if options.layer_config is not None:
            self.lc_entries, self.lc_default = load_layer_config(options.layer_config, options)
        # most specific first; the first match wins
        self.lc_entries.sort(key=lambda e: (_literal_len(e.pattern), len(e.pattern), e.order), reverse=True)

    def _finish(self, p: LayerPlan, fmt: str, opts: dict, method: str, reason: str, fpmm: bool | None = None,
                transforms: dict | None = None) -> LayerPlan:
        why = detection_reason(p.layer, fmt, p.shape, opts)
        if why:
            p.layer, p.reason = None, why
            return p
        why = registry.get_codec(fmt).shape_reason(p.shape, opts)
        if why:
            p.layer, p.reason = None, f"{UNSTORABLE} {why}: kept in high precision"
            return p
        p.format, p.opts, p.method, p.reason = fmt, dict(opts), method, reason
        p.opts.update(layer_transforms(self.transforms if transforms is None else transforms, p.shape))
        spec = registry.get_spec(fmt)
        if not spec.writes_comfy_quant:
            # The layout's own serialization records the original dtype (bitsandbytes quant state);
            # it has no .comfy_quant to carry full_precision_matrix_mult.
            p.opts["dtype"] = p.dtype
        elif fpmm if fpmm is not None else self.o.full_precision_matrix_mult:
            p.opts["full_precision_matrix_mult"] = True
        if self.o.input_scale and spec.input_scale and "rotation" not in p.opts:
            p.opts["input_scale"] = 1.0  # (a static scale of unrotated inputs does not fit rotated ones)
        from .rounding import METHODS

        if p.method not in METHODS:
            raise OptionError(f"layer {p.layer}: unknown rounding method {p.method!r}; known: {', '.join(METHODS)}")
        return p

    def plan(self, name: str, shape: Iterable[int], dtype: str) -> LayerPlan:
        shape = tuple(shape)
        p = LayerPlan(name=name, shape=shape, dtype=dtype)
        layer = layer_name(name)
        if layer is None or len(shape) != 2:
            p.reason = "not a 2-D .weight" if layer is None or len(shape) != 2 else ""
            return p
        if dtype not in ("float32", "float16", "bfloat16", "float64"):
            p.reason = f"dtype {dtype} is not a float weight (already quantized?)"
            return p
        if 0 in shape:
            p.reason = "empty tensor"
            return p
        p.layer = layer
        method = self.o.method
        if self.custom_re is not None and self.custom_re.search(layer):
            fmt, opts = self.custom
            if self.o.custom_heur:
                why = heuristic_reason(fmt, shape, opts)
                if why:
                    p.layer, p.reason = None, f"custom layer, {why}"
                    return p
            return self._finish(p, fmt, opts, "rtn" if self.o.custom_simple else method,
                                f"--custom-layers -> {self.o.custom_type}")
        for e in self.lc_entries:
            if e.regex.search(layer):
                if e.fmt is None:
                    p.layer, p.reason = None, f"--layer-config {e.pattern!r}: keep"
                    return p
                return self._finish(p, e.fmt, e.opts, e.method or method, f"--layer-config {e.pattern!r}", e.fpmm,
                                    e.transforms)
        if self.embed_re.search(layer):
            p.layer, p.reason = None, "embedding table (kept)"
            return p
        if self.exclude_re is not None and self.exclude_re.search(layer):
            p.layer, p.reason = None, "--exclude-layers"
            return p
        for flag, rx in self.preset_res:
            if rx.search(layer):
                p.layer, p.reason = None, f"--{flag} preset: high precision"
                return p
        if self.lc_default is not None:
            if self.lc_default.fmt is None:
                p.layer, p.reason = None, "--layer-config _default: keep"
                return p
            fmt, opts, reason = self.lc_default.fmt, self.lc_default.opts, "--layer-config _default"
            method = self.lc_default.method or method
            tf = self.lc_default.transforms
        else:
            (fmt, opts), reason, tf = self.primary, "primary mode", None
        if self.o.heur:
            why = heuristic_reason(fmt, shape, opts)
            if why:
                p.layer, p.reason = None, why
                return p
        return self._finish(p, fmt, opts, method, reason, self.lc_default.fpmm if self.lc_default else None, tf)
