"""Parsing of the ``--edit-quant`` flags: ``--add-keys``, ``--remove-keys``, ``--quant-filter``.

``--add-keys`` syntax (values with commas and quotes work). One of:

- a JSON object: ``{"full_precision_matrix_mult": true, "note": "a, \\"b\\""}``;
- ``key=value`` pairs separated by commas: ``full_precision_matrix_mult=true, note="a, b"``;
- the peer tool's Python-like pairs: ``'full_precision_matrix_mult': true, 'note': 'x'`` (also with
  ``{...}`` around them, and ``True``/``False``/``None`` spellings).

Keys are bare words (``[A-Za-z_][A-Za-z0-9_.-]*``) or quoted. Values: a double-quoted string (JSON
escapes), a single-quoted string (backslash escapes ``\\'`` ``\\\\``), a list ``[...]`` of values, or a bare
word up to the next top-level comma: ``true``/``false``/``null`` (any case, and ``none``) become JSON
literals, integers and decimals become numbers, anything else is taken as a string (a bare word may
not contain quotes or brackets: quote the whole value). Commas inside quotes or brackets never split.
A key given twice is an error.

Refused: setting or removing ``format`` (it states what the stored tensors are; change it by
converting), nested objects as values, non-finite numbers, and wrong types for the keys this pack
interprets (``full_precision_matrix_mult``/``per_row`` bool, ``group_size`` positive int,
``orig_shape`` list of positive ints, ``orig_dtype`` string).

``--remove-keys`` is a comma list of key names. ``--quant-filter REGEX`` selects layers whose name
matches with ``re.search`` (anchor with ``^...$`` for a full match); an invalid regex is an OptionError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

from .errors import OptionError

PROTECTED_KEYS = ("format",)


_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


class _KeysParser:
    """Recursive-descent parser for the ``--add-keys`` syntax described in the module docstring."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def fail(self, msg: str):
        raise OptionError(f"--add-keys: {msg} at position {self.i} in {self.s!r}")

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def parse(self) -> dict:
        self.ws()
        if self.peek() == "{":
            self.i += 1
            out = self.items("}")
        else:
            out = self.items(None)
        self.ws()
        if self.i != len(self.s):
            self.fail(f"unexpected {self.peek()!r}")
        return out

    def items(self, closing: str | None) -> dict:
        out: dict = {}
        self.ws()
        if closing and self.peek() == closing:
            self.i += 1
            return out
        while True:
            self.ws()
            key = self.key()
            self.ws()
            if self.peek() not in ("=", ":"):
                self.fail(f"expected '=' or ':' after key {key!r}")
            self.i += 1
            self.ws()
            value = self.value(stops=("," + closing) if closing else ",", key=key)
            if key in out:
                self.fail(f"key {key!r} given twice")
            out[key] = value
            self.ws()
            c = self.peek()
            if c == "":
                if closing:
                    self.fail(f"missing closing {closing!r}")
                return out
            if c == ",":
                self.i += 1
                self.ws()
                if self.peek() == "" and not closing:
                    return out  # trailing comma
                if closing and self.peek() == closing:
                    self.i += 1
                    return out
                continue
            if closing and c == closing:
                self.i += 1
                return out
            self.fail(f"expected ',' after the value of {key!r}, found {c!r}")

    def key(self) -> str:
        c = self.peek()
        if c in ("'", '"'):
            k = self.quoted()
        else:
            m = _BARE_KEY.match(self.s, self.i)
            if not m:
                self.fail("expected a key")
            k = m.group(0)
            self.i = m.end()
        if not k:
            self.fail("empty key")
        return k

    def value(self, stops: str, key: str):
        c = self.peek()
        if c in ("'", '"'):
            return self.quoted()
        if c == "[":
            return self.list_()
        if c == "{":
            self.fail(f"value of {key!r}: nested objects are not allowed (the .comfy_quant dict is flat)")
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in stops:
            if self.s[self.i] in "[]{}\"'":
                self.fail(f"value of {key!r}: quote the whole value if it contains {self.s[self.i]!r}")
            self.i += 1
        word = self.s[start:self.i].strip()
        if not word:
            self.fail(f"missing value for {key!r}")
        return _bare_value(word)

    def list_(self) -> list:
        self.i += 1
        out = []
        self.ws()
        if self.peek() == "]":
            self.i += 1
            return out
        while True:
            self.ws()
            out.append(self.value(stops=",]", key="list element"))
            self.ws()
            c = self.peek()
            if c == ",":
                self.i += 1
                continue
            if c == "]":
                self.i += 1
                return out
            self.fail("expected ',' or ']' in list")

    def quoted(self) -> str:
        q = self.s[self.i]
        if q == '"':
            try:
                val, end = json.JSONDecoder().raw_decode(self.s, self.i)
            except json.JSONDecodeError as e:
                self.fail(f"bad double-quoted string ({e.msg})")
            self.i = end
            return val
        # Single quotes: Python-ish escapes, so the peer tool's syntax keeps working.
        self.i += 1
        buf = []
        escapes = {"'": "'", '"': '"', "\\": "\\", "n": "\n", "t": "\t"}
        while self.i < len(self.s):
            ch = self.s[self.i]
            if ch == "\\" and self.i + 1 < len(self.s):
                nxt = self.s[self.i + 1]
                buf.append(escapes.get(nxt, "\\" + nxt))
                self.i += 2
                continue
            if ch == "'":
                self.i += 1
                return "".join(buf)
            buf.append(ch)
            self.i += 1
        self.fail("unterminated single-quoted string")


def _bare_value(word: str):
    low = word.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("null", "none"):
        return None
    if _INT.fullmatch(word):
        return int(word)
    if _FLOAT.fullmatch(word):
        return float(word)
    return word


def _check_known_key(key: str, value) -> None:
    def bad(expected: str):
        raise OptionError(f"--add-keys: {key!r} must be {expected}, got {value!r}")

    if key in ("full_precision_matrix_mult", "per_row") and not isinstance(value, bool):
        bad("true or false")
    if key == "group_size" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        bad("a positive integer")
    if key == "orig_shape" and not (isinstance(value, list) and value
                                    and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)):
        bad("a list of positive integers")
    if key == "orig_dtype" and not isinstance(value, str):
        bad("a string")


def parse_add_keys(spec: str | Mapping | None) -> dict:
    """``--add-keys`` value -> dict (see the module docstring). A dict passes through the same checks."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        out = dict(spec)
    else:
        if not spec.strip():
            raise OptionError("--add-keys is empty; give e.g. 'full_precision_matrix_mult=true'")
        out = _KeysParser(spec).parse()
        if not out:
            raise OptionError(f"--add-keys {spec!r} contains no keys")
    for k, v in out.items():
        if not isinstance(k, str) or not k:
            raise OptionError(f"--add-keys: keys must be non-empty strings, got {k!r}")
        if k in PROTECTED_KEYS:
            raise OptionError(f"--add-keys: refusing to set {k!r}: it states what the stored tensors are; re-convert the file to change it")
        if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, dict) for x in v)):
            raise OptionError(f"--add-keys: value of {k!r}: nested objects are not allowed (the .comfy_quant dict is flat)")
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            raise OptionError(f"--add-keys: value of {k!r} must be finite")
        _check_known_key(k, v)
    return out


def parse_remove_keys(spec: str | Iterable[str] | None) -> list[str]:
    """``--remove-keys`` comma list -> key names (whitespace stripped, duplicates dropped)."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for k in (str(x).strip() for x in items):
        if k and k not in out:
            out.append(k)
    if not out:
        raise OptionError(f"--remove-keys {spec!r} names no keys")
    for k in out:
        if k in PROTECTED_KEYS:
            raise OptionError(f"--remove-keys: refusing to remove {k!r}: every quantized layer must state its format")
    return out


def compile_filter(regex: str | None, flag: str = "--quant-filter") -> re.Pattern | None:
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as e:
        raise OptionError(f"{flag}: invalid regular expression {regex!r}: {e}") from None
