"""Streaming ``.safetensors`` reader (no whole-file loads) and the file-format helpers both halves share.

File layout (the safetensors spec): 8 bytes little-endian u64 ``N``; ``N`` bytes of UTF-8 JSON
``{"__metadata__": {str: str}, name: {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]}}``
(offsets relative to the byte after the header, tensors packed with no gaps, header padded with
spaces to a multiple of 8); then the raw little-endian row-major data.

Public API (used by convert.py, edit.py, hybridize.py and the ComfyUI node)
--------------------------------------------------------------------------
``read_header(path) -> (infos: dict[name, TensorInfo], metadata: dict[str, str])``
    Parses and validates the header against the file size (rules below). ``infos`` is in file
    (offset) order. Raises ``InputFileError`` naming the file (and the tensor) for anything refused.
    Every entry point of the pack (CLI, Quantize Model, the loaders, the Info node and the file-info
    route) opens files through this function, so they all accept and refuse the same files.

``SafetensorsReader(path)`` (context manager; ``open_reader(path)`` is the same)
    ``.infos``, ``.metadata``, ``.read(name, buffer=None) -> torch.Tensor`` (a fresh CPU tensor, or a
    view into the caller's reusable uint8 ``buffer``; one tensor at a time, via ``os.preadv`` so several
    threads may read at once and nothing is memory-mapped: the resident memory of a conversion is the
    tensors in flight, not the file). ``.keys()``.

Reader rules (and why)
----------------------
The rules of the safetensors format as the ``safetensors`` package itself enforces them (a file it
refuses must not be half-read by us, and a file we accept must load in ComfyUI), plus bounds that keep a
hostile header from costing time or memory:
- the length field is 2 .. ``MAX_HEADER_BYTES`` (100 MB, safetensors' own cap) and fits in the file;
- the header is UTF-8 JSON starting with ``{``, parsed by ``schema.loads``: nesting <= 64 levels (no
  ``RecursionError``), no duplicate keys (so no two tensors share a name, and no entry has two
  ``dtype``s), no NaN/Infinity literals;
- ``__metadata__`` (optional) maps strings to strings; its ``_quantization_metadata`` value, when
  present, is JSON by the same rules and an object with a ``layers`` object of objects
  (``schema.check_quant_header``; the per-layer fields are checked where they are used, by
  ``metadata.check_layer_dict``, because the metadata editor must be able to fix a bad field);
- every tensor entry is an object with ``dtype`` (a string naming a known dtype), ``shape`` (a list of
  at most ``MAX_NDIM`` non-negative JSON integers: ``true`` is not 1) and ``data_offsets`` (two
  non-negative integers ``[b, e]``, ``b <= e``, inside the data section), with ``e - b`` exactly
  ``dtype size x prod(shape)``; an empty tensor's dimensions are at most ``MAX_EMPTY_DIM`` (2^32),
  every other dimension is bounded by the file's size through the byte count;
- sorted by offset, the tensors tile the data section exactly: the first starts at 0, each starts
  where the previous ends (no overlap: two tensors would alias the same bytes; no gap) and the last
  ends at the end of the file (trailing bytes are refused, as safetensors does: a header that does not
  describe all of its file is not trusted).
So no shape the reader admits can make anyone allocate more than the file's own size.

The writing half (``AtomicSafetensorsWriter``, ``write_safetensors``, ``build_header``, partial-file
handling) lives in ``safetensors_writer.py``.

``same_file(a, b)``, ``iter_tensors(path, names=None)``: path identity (symlinks, hard links) and a
one-tensor-at-a-time iterator.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from . import schema
from .errors import InputFileError
from .formats.base import FormatError, TensorSpec

# safetensors dtype string <-> torch dtype. Built defensively: older torch lacks some dtypes.
_ST_DTYPES: dict[str, torch.dtype] = {}
for _st, _attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
):
    if hasattr(torch, _attr):
        _ST_DTYPES[_st] = getattr(torch, _attr)
_TORCH_TO_ST = {v: k for k, v in _ST_DTYPES.items()}

# A header larger than this is not a real checkpoint header (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_NDIM = 16  # torch's own limit is 64; real checkpoints use <= 5 (conv3d)
MAX_EMPTY_DIM = 1 << 32  # a dimension of an empty tensor is not backed by bytes: bounded separately
QUANT_METADATA_KEY = "_quantization_metadata"  # the pack's own header object (metadata.QUANT_METADATA_KEY)
_PARTIAL_RE = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


_ELEMENT_SIZE: dict[torch.dtype, int] = {}


def element_size(dtype: torch.dtype) -> int:
    n = _ELEMENT_SIZE.get(dtype)
    if n is None:
        n = _ELEMENT_SIZE[dtype] = torch.empty((), dtype=dtype).element_size()
    return n


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a file. ``offset`` is absolute (from the start of the file)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.dtype, self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _bad(path, msg: str) -> InputFileError:
    return InputFileError(f"{path}: {msg}")


def read_header(path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; see "Reader rules" in the module docstring."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _bad(path, "input file does not exist")
    if os.path.isdir(path):
        raise _bad(path, "is a directory, expected a .safetensors file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES:
                raise _bad(path, f"not a safetensors file (header length field {n} is implausible)")
            if 8 + n > size:
                raise _bad(path, f"truncated: header declares {n} bytes but the file has {size - 8} after the length field")
            raw = f.read(n)
    except PermissionError as e:
        raise _bad(path, f"cannot read input file ({e.strerror})") from None
    except IsADirectoryError:
        raise _bad(path, "is a directory, expected a .safetensors file") from None
    except OSError as e:
        raise _bad(path, f"cannot read input file ({e.strerror or e})") from None
    if len(raw) != n:
        raise _bad(path, "truncated while reading the header")
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        raise _bad(path, "not a safetensors file (header is not JSON)")
    try:
        header = schema.loads(raw, "header", error=InputFileError)
    except InputFileError as e:
        raise _bad(path, f"not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = _check_metadata(path, {} if metadata is None else metadata)
    data_start = 8 + n
    data_size = size - data_start
    infos = [_tensor_info(path, name, e, data_start, data_size) for name, e in header.items()]
    infos.sort(key=lambda t: (t.offset, t.offset + t.nbytes))
    pos = data_start
    for t in infos:  # packed in offset order: no gap, no overlap (what safetensors itself demands)
        if t.offset != pos:
            what = "overlaps the previous tensor" if t.offset < pos else f"leaves a gap of {t.offset - pos} bytes"
            raise _bad(path, f"tensor {t.name!r}: data_offsets [{t.offset - data_start}, "
                             f"{t.offset - data_start + t.nbytes}] {what} (tensors must be packed back to back)")
        pos += t.nbytes
    if pos > size:
        raise _bad(path, f"truncated: tensor data ends at byte {pos} but the file has {size} bytes")
    if pos < size:
        raise _bad(path, f"{size - pos} bytes after the last tensor's data (the header does not describe them)")
    return {t.name: t for t in infos}, metadata


def _check_metadata(path: str, metadata) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    raw = metadata.get(QUANT_METADATA_KEY)
    if raw is not None:
        # The pack's own metadata object: its JSON must be safe to parse for every later reader.
        try:
            where = f"header {QUANT_METADATA_KEY}"
            schema.check_quant_header(schema.loads(raw, where), where)
        except FormatError as e:
            raise _bad(path, str(e)) from None
    return metadata


def _tensor_info(path: str, name: str, e, data_start: int, data_size: int) -> TensorInfo:
    where = f"tensor {name!r}"
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise _bad(path, f"{where}: malformed header entry (needs dtype, shape and data_offsets)")
    st = e["dtype"]
    dtype = _ST_DTYPES.get(st) if isinstance(st, str) else None
    if dtype is None:
        raise _bad(path, f"{where}: unsupported dtype {st!r}")
    shape, offs = e["shape"], e["data_offsets"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(schema.is_int(d) and d >= 0 for d in shape):
        raise _bad(path, f"{where}: shape must be a list of at most {MAX_NDIM} non-negative integers, "
                         f"found {shape!r:.80}")
    if not isinstance(offs, list) or len(offs) != 2 or not all(schema.is_int(o) and o >= 0 for o in offs):
        raise _bad(path, f"{where}: data_offsets must be two non-negative integers, found {offs!r:.80}")
    b, end = offs
    if b > end:
        raise _bad(path, f"{where}: data_offsets {offs} end before they begin")
    if end > data_size:
        raise _bad(path, f"truncated: {where} ends at data byte {end} but the file has {data_size} data bytes")
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0 and any(d > MAX_EMPTY_DIM for d in shape):
        raise _bad(path, f"{where}: empty tensor with an absurd dimension in shape {shape}")
    nbytes = numel * element_size(dtype)
    if end - b != nbytes:
        raise _bad(path, f"{where}: data_offsets {offs} ({end - b} bytes) do not match {st} {shape} "
                         f"({nbytes} bytes)")
    return TensorInfo(name, dtype, tuple(shape), data_start + b, nbytes)


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage (no copy, no numpy dependency: torch
    tensors do not implement the buffer protocol themselves). The caller keeps ``t`` alive while using it."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def _read_exact(fd: int, buf: memoryview, offset: int, path: str, name: str) -> None:
    done = 0
    total = len(buf)
    while done < total:
        # preadv releases the GIL and has no shared file position: safe from several threads.
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise _bad(path, f"truncated while reading tensor {name!r}")
        done += got


class SafetensorsReader:
    """Reads one tensor at a time from a safetensors file (see module docstring)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.infos, self.metadata = read_header(self.path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise _bad(self.path, f"cannot open input file ({e.strerror})") from None

    def keys(self) -> list[str]:
        return list(self.infos)

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name`` as a CPU tensor: a fresh one, or a view of the first bytes of ``buffer``
        (a contiguous uint8 CPU tensor of at least the tensor's size) when given. Reusing one buffer
        saves the page faults of fresh memory, which cost more than the read itself."""
        info = self.infos[name]
        if buffer is None:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
        else:
            if buffer.dtype != torch.uint8 or buffer.device.type != "cpu" or buffer.numel() < info.nbytes:
                raise ValueError(f"{name}: read buffer must be a CPU uint8 tensor of >= {info.nbytes} bytes")
            buf = buffer.reshape(-1)[:info.nbytes]
        if info.nbytes:
            _read_exact(self._fd, byte_view(buf), info.offset, self.path, name)
        return buf.view(info.dtype).reshape(info.shape) if info.nbytes else torch.empty(info.shape, dtype=info.dtype)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def open_reader(path) -> SafetensorsReader:
    return SafetensorsReader(path)


def same_file(a, b) -> bool:
    """True when two paths name the same file (symlinks, hard links, relative paths)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(os.fspath(a)) == os.path.realpath(os.fspath(b))


def iter_tensors(path, names: Iterable[str] | None = None):
    """Yield ``(name, tensor)`` one at a time in file order (convenience for small tools)."""
    with SafetensorsReader(path) as r:
        for n in (names if names is not None else r.keys()):
            yield n, r.read(n)


__all__ = ["TensorInfo", "read_header", "SafetensorsReader", "open_reader", "st_dtype", "byte_view", "same_file",
           "iter_tensors"]
