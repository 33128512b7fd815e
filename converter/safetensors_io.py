"""Streaming ``.safetensors`` reader (no whole-file loads) and the file-format helpers both halves share.

File layout (the safetensors spec): 8 bytes little-endian u64 ``N``; ``N`` bytes of UTF-8 JSON
``{"__metadata__": {str: str}, name: {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]}}``
(offsets relative to the byte after the header, tensors packed with no gaps, header padded with
spaces to a multiple of 8); then the raw little-endian row-major data.

Public API (used by convert.py, edit.py, hybridize.py and the ComfyUI node)
--------------------------------------------------------------------------
``read_header(path) -> (infos: dict[name, TensorInfo], metadata: dict[str, str])``
    Parses and validates the header against the file size. ``infos`` is in file (offset) order.
    Raises ``InputFileError`` naming the file for: missing/unreadable, a directory, not safetensors,
    truncated (header or data shorter than declared), unknown dtype, inconsistent offsets.

``SafetensorsReader(path)`` (context manager; ``open_reader(path)`` is the same)
    ``.infos``, ``.metadata``, ``.read(name, buffer=None) -> torch.Tensor`` (a fresh CPU tensor, or a
    view into the caller's reusable uint8 ``buffer``; one tensor at a time, via ``os.preadv`` so several
    threads may read at once and nothing is memory-mapped: the resident memory of a conversion is the
    tensors in flight, not the file). ``.keys()``.

The writing half (``AtomicSafetensorsWriter``, ``write_safetensors``, ``build_header``, partial-file
handling) lives in ``safetensors_writer.py``.

``same_file(a, b)``, ``iter_tensors(path, names=None)``: path identity (symlinks, hard links) and a
one-tensor-at-a-time iterator.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import InputFileError
from .formats.base import TensorSpec

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
_PARTIAL_RE = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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
        n = 1
        for d in self.shape:
            n *= d
        return n


def _bad(path, msg: str) -> InputFileError:
    return InputFileError(f"{path}: {msg}")


def read_header(path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; see the module docstring."""
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
            if n == 0 or n > MAX_HEADER_BYTES:
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
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise _bad(path, "not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_start = 8 + n
    infos: list[TensorInfo] = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise _bad(path, f"tensor {name!r}: malformed header entry")
        dtype = _ST_DTYPES.get(e["dtype"])
        if dtype is None:
            raise _bad(path, f"tensor {name!r}: unsupported dtype {e['dtype']!r}")
        shape = e["shape"]
        offs = e["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise _bad(path, f"tensor {name!r}: malformed shape or data_offsets")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * element_size(dtype)
        b, end = offs
        if end - b != nbytes or b < 0:
            raise _bad(path, f"tensor {name!r}: data_offsets {offs} do not match {e['dtype']} {shape} ({nbytes} bytes)")
        infos.append(TensorInfo(name, dtype, tuple(shape), data_start + b, nbytes))
    infos.sort(key=lambda t: (t.offset, t.nbytes))
    data_end = max((t.offset + t.nbytes for t in infos), default=data_start)
    if data_end > size:
        raise _bad(path, f"truncated: tensor data ends at byte {data_end} but the file has {size} bytes")
    return {t.name: t for t in infos}, metadata


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
