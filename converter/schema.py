"""Schemas of the metadata objects the pack reads from files, and the one JSON parser they go through.

Every value read from a file is hostile until checked: a broken download, another tool's odd writer, or
a crafted file. The checks here turn every such value into a ``FormatError`` (``formats.base``) naming
where it came from (file, layer, tensor) and what is wrong, before any of it is used for a computation
or an allocation.

JSON (``loads``)
----------------
Every JSON text of a file (the safetensors header, ``_quantization_metadata``, ``.comfy_quant``,
bitsandbytes quant states) is parsed by ``loads(text, where)``:
- nesting at most ``MAX_JSON_DEPTH`` (64) levels, checked BEFORE parsing by a scan that skips strings
  (the stdlib parser recurses once per level and ends in ``RecursionError`` on a deep file; real
  metadata nests 3 levels);
- no duplicate keys in any object (the stdlib keeps the last one silently; safetensors refuses them,
  and two readers picking different duplicates would see different files);
- no ``NaN`` / ``Infinity`` / ``-Infinity`` literals (not JSON; a NaN offset would poison a decode);
- integers of at most 4300 digits (Python's own limit) -- larger ones are a ``FormatError`` too.

Sizes
-----
Every size read from metadata is bounded before use, so that no allocation or integer follows from a
file that its own bytes cannot back:
- a logical dimension (``orig_shape``, a quant state's ``shape``) is a positive int <= ``MAX_DIM``
  (2^31 - 1: no real layer is wider, and torch indexes with int64 products of two such dims safely);
- a layer's logical element count is at most ``2 * weight_bytes`` when the stored weight's size is
  known (4-bit is the densest layout: two elements per byte), and at most ``MAX_NUMEL`` (2^40) always;
- a ``group_size`` is an int in 1..``MAX_GROUP`` (65536); bitsandbytes block sizes are one of
  bitsandbytes' own (32 .. 4096), the nested block size too (bitsandbytes writes 256);
- a nested offset is a finite number.

Objects
-------
``check_quant_header(doc, where)``: ``_quantization_metadata`` = object with ``layers`` an object of
objects whose ``format``, when present, is a string; ``format_version``, when present, a string.
Unknown top-level keys are kept.
``check_layer_fields(d, where)``: a ``.comfy_quant`` / header layer dict: ``format`` a string; known
fields typed (``group_size``, ``per_row``, ``full_precision_matrix_mult``, ``orig_dtype``,
``orig_shape``); unknown fields kept (other tools write their own). ``metadata.check_layer_dict`` adds
the "format is known" check.
``check_quant_state(d, where, quant_type)``: a bitsandbytes quant state: ``quant_type`` (= the key's),
``blocksize``, ``dtype``, ``shape`` required; ``nested_blocksize`` / ``nested_offset`` /
``nested_dtype`` typed when present.
``check_logical_size(shape, weight_bytes, where)``: the size rule above.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate

from .formats.base import FormatError

MAX_JSON_DEPTH = 64
MAX_DIM = 2**31 - 1
MAX_NUMEL = 2**40
MAX_GROUP = 1 << 16

# A JSON string (escapes included); removed before counting brackets so that "[" inside a name is text.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


class _Refused(ValueError):
    """Raised from inside the stdlib parser's hooks; turned into a FormatError by ``loads``."""


def json_depth(data: bytes) -> int:
    """The deepest bracket nesting of a JSON text, ignoring brackets inside strings (an upper bound for
    malformed text, which the parser then refuses). Linear time, no recursion."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    if not brackets:
        return 0
    return max(0, max(accumulate(map(_STEP.__getitem__, brackets))))


def _pairs(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Refused(f"duplicate key {k!r}")
        d[k] = v
    return d


def _constant(name):
    raise _Refused(f"{name} is not a JSON number")


def loads(data, where: str, max_depth: int = MAX_JSON_DEPTH, error: type[Exception] = FormatError,
          what: str = "JSON"):
    """Parse a JSON text from a file (str, bytes or bytearray) by the rules of the module docstring;
    ``error(f"{where}: ...")`` for anything refused."""
    if isinstance(data, str):
        raw = data.encode("utf-8", "surrogatepass")
    else:
        raw = bytes(data)
        try:
            data = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: invalid {what} (not UTF-8: {e.reason} at byte {e.start})") from None
    depth = json_depth(raw)
    if depth > max_depth:
        raise error(f"{where}: {what} nested {depth} levels deep (at most {max_depth} accepted)")
    try:
        return json.loads(data, object_pairs_hook=_pairs, parse_constant=_constant)
    except _Refused as e:
        raise error(f"{where}: invalid {what} ({e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: invalid {what} ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits
        raise error(f"{where}: invalid {what} ({e})") from None


# ---- scalar rules --------------------------------------------------------------------------------

def is_int(v) -> bool:
    """A JSON integer (``true``/``false`` are bools, not ints, in a file's metadata)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _tname(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            float: "a float", int: "an integer"}.get(type(v), type(v).__name__)


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def int_in(v, lo: int, hi: int, where: str, what: str) -> int:
    if not is_int(v) or not lo <= v <= hi:
        kind = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise FormatError(f"{where}: {what} must be {kind} (at most {hi}), found {_tname(v)} {_show(v)}")
    return v


_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def shape_of(v, where: str, what: str = "shape", ndim: tuple[int, ...] = (2,)) -> tuple[int, ...]:
    """A logical shape: a list of ``ndim`` ints, each in 1..MAX_DIM, with at most MAX_NUMEL elements."""
    ok = isinstance(v, (list, tuple)) and len(v) in ndim and all(is_int(d) and 1 <= d <= MAX_DIM for d in v)
    if not ok:
        dims = " or ".join(_WORDS.get(n, str(n)) for n in ndim)
        raise FormatError(f"{where}: {what} must be {dims} positive integers (each at most {MAX_DIM}), "
                          f"found {_show(v)}")
    if math.prod(v) > MAX_NUMEL:
        raise FormatError(f"{where}: {what} {list(v)} has more than {MAX_NUMEL} elements")
    return tuple(v)


def check_logical_size(shape, weight_bytes: int | None, where: str) -> None:
    """A layer of ``shape`` cannot have more elements than twice its stored weight's bytes."""
    if weight_bytes is None or shape is None:
        return
    n = math.prod(shape)
    if n > 2 * max(int(weight_bytes), 0):
        raise FormatError(f"{where}: shape {list(shape)} ({n} elements) cannot be stored in the "
                          f"{weight_bytes} bytes of its weight")


# ---- objects -------------------------------------------------------------------------------------

def check_quant_header(doc, where: str) -> dict:
    """``_quantization_metadata``: ``{"format_version": str?, "layers": {name: {...}}}``."""
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: expected a JSON object, found {_tname(doc)}")
    if "format_version" in doc and not isinstance(doc["format_version"], str):
        raise FormatError(f"{where}: format_version must be a string, found {_show(doc['format_version'])}")
    layers = doc.get("layers")
    if not isinstance(layers, dict):
        raise FormatError(f"{where}: expected a 'layers' object, found {_tname(layers)}")
    for name, d in layers.items():
        if not isinstance(d, dict):
            raise FormatError(f"{where}: layer {name!r} must be an object, found {_tname(d)}")
        if "format" in d and not isinstance(d["format"], str):
            raise FormatError(f"{where}: layer {name!r}: format must be a string, found {_tname(d['format'])} "
                              f"{_show(d['format'])}")
    return doc


def check_layer_fields(d, where: str) -> dict:
    """The known fields of a ``.comfy_quant`` / header layer dict (see the module docstring)."""
    if not isinstance(d, dict):
        raise FormatError(f"{where}: expected a JSON object, found {_tname(d)}")
    if "format" not in d:
        raise FormatError(f"{where}: no 'format' field")
    if not isinstance(d["format"], str):
        raise FormatError(f"{where}: format must be a string, found {_tname(d['format'])} {_show(d['format'])}")
    if d.get("group_size") is not None:
        int_in(d["group_size"], 1, MAX_GROUP, where, "group_size")
    for flag in ("per_row", "full_precision_matrix_mult"):
        if flag in d and not isinstance(d[flag], bool):
            raise FormatError(f"{where}: {flag} must be true or false, found {_show(d[flag])}")
    if "orig_dtype" in d and not isinstance(d["orig_dtype"], str):
        raise FormatError(f"{where}: orig_dtype must be a string, found {_show(d['orig_dtype'])}")
    if "orig_shape" in d:
        shape_of(d["orig_shape"], where, "orig_shape")
    return d


def check_quant_state(d, where: str, quant_type: str) -> dict:
    """A bitsandbytes quant state dict (see the module docstring); returns it unchanged."""
    from .formats.bnb4bit import _DTYPES, BLOCKSIZES

    if not isinstance(d, dict):
        raise FormatError(f"{where}: quant state must be a JSON object, found {_tname(d)}")
    for req in ("quant_type", "blocksize", "dtype", "shape"):
        if req not in d:
            raise FormatError(f"{where}: bitsandbytes quant state lacks '{req}'")
    if d["quant_type"] != quant_type:
        raise FormatError(f"{where}: quant state key says {quant_type} but its quant_type is {_show(d['quant_type'])}")
    if not is_int(d["blocksize"]) or d["blocksize"] not in BLOCKSIZES:
        raise FormatError(f"{where}: blocksize must be one of {BLOCKSIZES}, found {_tname(d['blocksize'])} "
                          f"{_show(d['blocksize'])}")
    if not isinstance(d["dtype"], str) or d["dtype"].removeprefix("torch.") not in _DTYPES:
        raise FormatError(f"{where}: dtype must be one of {tuple(_DTYPES)}, found {_show(d['dtype'])}")
    shape_of(d["shape"], where, "shape", ndim=(1, 2, 3, 4))
    if "nested_blocksize" in d and (not is_int(d["nested_blocksize"]) or d["nested_blocksize"] not in BLOCKSIZES):
        raise FormatError(f"{where}: nested_blocksize must be one of {BLOCKSIZES}, found "
                          f"{_tname(d['nested_blocksize'])} {_show(d['nested_blocksize'])}")
    if "nested_offset" in d:
        off = d["nested_offset"]
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off) or abs(off) > 3.4e38:
            raise FormatError(f"{where}: nested_offset must be a finite float32 number, found {_show(off)}")
    if "nested_dtype" in d and not isinstance(d["nested_dtype"], str):
        raise FormatError(f"{where}: nested_dtype must be a string, found {_show(d['nested_dtype'])}")
    return d


__all__ = ["MAX_JSON_DEPTH", "MAX_DIM", "MAX_NUMEL", "MAX_GROUP", "loads", "json_depth", "is_int", "int_in",
           "shape_of", "check_logical_size", "check_quant_header", "check_layer_fields", "check_quant_state"]
