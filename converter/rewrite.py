"""Copying a ``.safetensors`` file with a few tensors changed, and the quantization metadata it carries.

Used by ``edit.py`` (``--edit-quant``) and ``hybridize.py`` (``--make-hybrid-mxfp8``): both rewrite a
file where almost every tensor is copied byte for byte. ``rewrite_file`` streams one tensor at a time
through ``safetensors_writer.AtomicSafetensorsWriter`` (temp file beside the target, renamed when
complete; any error or Ctrl+C leaves no output). ``check_output_path`` (``safetensors_writer.py``, the
one convert uses too) refuses output == input (same path, symlink or hard link), an existing output
without ``overwrite`` and an unwritable directory, before any work.

Quantization metadata (ARCHITECTURE.md, "On-disk conventions"): ``<layer>.comfy_quant`` is a 1-D uint8 tensor holding
the UTF-8 JSON of a flat dict; the header ``__metadata__["_quantization_metadata"]`` is the JSON
``{"format_version": "1.0", "layers": {layer: dict}}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import metadata, schema
from .errors import Cancelled, InputFileError
from .formats.base import FormatError, TensorSpec
from .metadata import QUANT_METADATA_KEY
from .safetensors_io import SafetensorsReader
from .safetensors_writer import AtomicSafetensorsWriter

COMFY_QUANT_SUFFIX = ".comfy_quant"

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]

# ---------------------------------------------------------------------------------------------------
# .comfy_quant tensors and the header entry
# ---------------------------------------------------------------------------------------------------

MAX_CONFIG_BYTES = 1 << 16  # a .comfy_quant tensor is read whole; real ones are under 200 bytes
log = logging.getLogger("hybridquant")


def decode_comfy_quant(layer: str, t: torch.Tensor, path: str = "") -> dict:
    """The dict stored in ``layer.comfy_quant``; InputFileError naming file and layer if it is not one."""
    where = f"{path}: " if path else ""
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise InputFileError(f"{where}{layer}.comfy_quant: expected a 1-D uint8 tensor, found {t.dtype} {tuple(t.shape)}")
    try:
        cfg = schema.loads(bytes(t.tolist()), "comfy_quant")
    except FormatError as e:
        raise InputFileError(f"{where}{layer}.comfy_quant: not UTF-8 JSON ({str(e).split(': ', 1)[-1]})") from None
    if not isinstance(cfg, dict):
        raise InputFileError(f"{where}{layer}.comfy_quant: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def encode_comfy_quant(cfg: Mapping) -> torch.Tensor:
    """The ``.comfy_quant`` tensor for ``cfg``, written as ``metadata.py`` writes it.

    Decoding (above) and encoding here are deliberately lenient about the format name and field types
    (unlike ``metadata.py``'s checked path, which the loaders use): an editor must be able to open, and
    fix, a file another tool wrote with an odd field."""
    return metadata.encode_comfy_quant(cfg, check=False)


def parse_quant_header(metadata: Mapping[str, str], path: str = "") -> dict | None:
    """The parsed ``_quantization_metadata`` header value (``None`` when absent)."""
    raw = metadata.get(QUANT_METADATA_KEY)
    if raw is None:
        return None
    where = f"{path}: " if path else ""
    qm = schema.loads(raw, f"{where}header {QUANT_METADATA_KEY}", error=InputFileError)
    if not isinstance(qm, dict):
        raise InputFileError(f"{where}header {QUANT_METADATA_KEY} must be a JSON object")
    layers = qm.get("layers", {})
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise InputFileError(f"{where}header {QUANT_METADATA_KEY}: 'layers' must map layer names to objects")
    return qm


def read_layer_configs(reader: SafetensorsReader) -> dict[str, dict]:
    """``{layer: dict}`` from every ``*.comfy_quant`` tensor of the file (they are tiny). A
    ``.comfy_quant`` whose ``<layer>.weight`` is missing is refused: copying it would write a file that
    every loader refuses."""
    out = {}
    for name in reader.keys():
        if name.endswith(COMFY_QUANT_SUFFIX):
            layer = name[: -len(COMFY_QUANT_SUFFIX)]
            if f"{layer}.weight" not in reader.infos:
                raise InputFileError(f"{reader.path}: {name} describes layer {layer}, but '{layer}.weight' is not "
                                     "in the file")
            info = reader.infos[name]
            if info.nbytes > MAX_CONFIG_BYTES:
                raise InputFileError(f"{reader.path}: {name} is {info.nbytes} bytes; a layer's metadata is a few "
                                     "hundred")
            out[layer] = decode_comfy_quant(layer, reader.read(name), reader.path)
    return out


def drop_ghost_layers(qm: dict | None, reader: SafetensorsReader) -> tuple[dict | None, list[str]]:
    """``(qm without them, warnings)`` for the header ``layers`` entries whose ``<layer>.weight`` is not
    in the file (ghost layers, e.g. left by a tool that deleted tensors): they are dropped from the
    output's header, each with a warning on the ``hybridquant`` logger, never copied silently."""
    if qm is None:
        return None, []
    ghosts = metadata.ghost_layers(qm.get("layers", {}), reader.infos)
    if not ghosts:
        return qm, []
    shown = ", ".join(ghosts[:5]) + (f" and {len(ghosts) - 5} more" if len(ghosts) > 5 else "")
    msg = (f"{reader.path}: header {QUANT_METADATA_KEY} lists {len(ghosts)} layer(s) not in the file ({shown}); "
           "dropped from the output's header")
    log.warning(msg)
    return dict(qm, layers={k: v for k, v in qm["layers"].items() if k not in ghosts}), [msg]


@dataclass
class QuantConfigs:
    """A file's per-layer quantization dicts from both places: its ``.comfy_quant`` tensors and its
    header entry (ghost layers dropped; ``warnings`` says which)."""

    path: str
    tensors: dict[str, dict]  # {layer: dict} from the .comfy_quant tensors
    header: dict | None  # the parsed _quantization_metadata value, None when the file has none
    header_layers: dict[str, dict]  # its "layers" (a copy: edits do not touch ``header``)
    warnings: list[str]

    def layers(self) -> list[str]:
        return sorted(set(self.tensors) | set(self.header_layers))

    def format_of(self, layer: str):
        """The layer's format as the file states it; InputFileError when tensor and header disagree."""
        ft = self.tensors.get(layer, {}).get("format")
        fh = self.header_layers.get(layer, {}).get("format")
        if layer in self.tensors and layer in self.header_layers and ft != fh:
            raise InputFileError(f"{self.path}: layer {layer}: .comfy_quant says format {ft!r} but the header says "
                                 f"{fh!r}; refusing an inconsistent file")
        return ft if layer in self.tensors else fh


def read_quant_configs(reader: SafetensorsReader, path: str) -> QuantConfigs:
    """Every quantization dict of the open file (``read_layer_configs`` + the header, ghosts dropped)."""
    tensors = read_layer_configs(reader)
    qm, warnings = drop_ghost_layers(parse_quant_header(reader.metadata, path), reader)
    header_layers = dict(qm.get("layers", {})) if qm is not None else {}
    return QuantConfigs(path, tensors, qm, header_layers, warnings)


# ---------------------------------------------------------------------------------------------------
# Copying a file with a few tensors changed (shared with hybridize.py)
# ---------------------------------------------------------------------------------------------------

OnRead = Callable[[str, torch.Tensor], "Mapping[str, torch.Tensor] | None"]


class _BufferedReads:
    """Reads whole tensors of ``reader``'s file into two reused buffers (slots 0 and 1)."""

    def __init__(self, reader: SafetensorsReader, names):
        self.path = reader.path
        self.infos = reader.infos
        size = max((self.infos[n].nbytes for n in names), default=0)
        self.slots = [torch.empty(size, dtype=torch.uint8) for _ in range(2 if len(names) > 1 else 1)]
        self.views = [memoryview(b.numpy()) for b in self.slots]
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise InputFileError(f"{self.path}: cannot open input file ({e.strerror})") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, name: str, slot: int) -> torch.Tensor:
        info = self.infos[name]
        n = info.nbytes
        if n == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        mv = self.views[slot]
        done = 0
        while done < n:
            got = os.preadv(self.fd, [mv[done:n]], info.offset + done)
            if got <= 0:
                raise InputFileError(f"{self.path}: truncated while reading tensor {name!r}")
            done += got
        return self.slots[slot][:n].view(info.dtype).reshape(info.shape)


def rewrite_file(reader: SafetensorsReader, output: str, *, replace: Mapping[str, torch.Tensor] | None = None,
                 insert_after: Mapping[str, Mapping[str, torch.Tensor | TensorSpec]] | None = None,
                 on_read: OnRead | None = None, metadata: Mapping[str, str] | None = None, overwrite: bool = False,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> int:
    """Write ``output``: the input's tensors in file order, byte for byte, except ``replace[name]``.

    ``insert_after[anchor]`` declares new tensors placed right after ``anchor``: a tensor is written as
    is; a bare ``TensorSpec`` must be produced by ``on_read(name, tensor)``, which sees every tensor
    copied from the input as it streams past and returns ``{new_name: tensor}`` for new tensors it can
    now compute (so a derived tensor needs no second read of its inputs). The tensor ``on_read`` gets
    lives in a reused buffer: it is valid only during the call (copy what must outlive it).

    Copying: two reused byte buffers of the largest tensor's size; one thread reads the next tensor
    while this one is written (``preadv``/``pwrite`` release the GIL). Reusing the buffers matters:
    a fresh allocation per tensor costs a page fault per 4 KiB and made the copy ~3x slower than the
    disk. Peak memory: two of the largest tensors plus what ``on_read`` keeps. Returns the bytes
    written; on any error (including ``cancel()`` returning true) no output exists and the input is
    untouched."""
    replace = dict(replace or {})
    insert_after = {k: dict(v) for k, v in (insert_after or {}).items()}
    for n in list(replace) + list(insert_after):
        if n not in reader.infos:
            raise KeyError(f"{n!r} is not a tensor of {reader.path}")
    specs: dict[str, TensorSpec] = {}
    given: dict[str, torch.Tensor] = {}
    for name, info in reader.infos.items():
        t = replace.get(name)
        specs[name] = TensorSpec(t.dtype, tuple(t.shape)) if t is not None else info.spec
        for new_name, new in insert_after.get(name, {}).items():
            if new_name in reader.infos or new_name in specs:
                raise KeyError(f"{new_name!r} already exists in {reader.path}")
            if isinstance(new, torch.Tensor):
                given[new_name] = new
                specs[new_name] = TensorSpec(new.dtype, tuple(new.shape))
            else:
                specs[new_name] = new
    total = sum(s.nbytes for s in specs.values())
    done = 0
    copied = [n for n in reader.infos if n not in replace]
    with AtomicSafetensorsWriter(output, specs, metadata if metadata is not None else reader.metadata,
                                 overwrite=overwrite) as w, contextlib.ExitStack() as stack, \
            ThreadPoolExecutor(1, thread_name_prefix="rewrite-read") as pool:
        def put(name: str, t: torch.Tensor) -> None:
            nonlocal done
            w.write(name, t)
            done += specs[name].nbytes
            if progress is not None:
                progress(done, total, name)

        raw = stack.enter_context(contextlib.closing(_BufferedReads(reader, copied)))
        pending = {copied[0]: pool.submit(raw.read, copied[0], 0)} if copied else {}
        k = 0  # index in ``copied`` of the tensor being prefetched
        for name in reader.infos:
            if cancel is not None and cancel():
                raise Cancelled(f"{output}: cancelled; no output written")
            extra = None
            if name in replace:
                put(name, replace[name])
            else:
                t = pending.pop(name).result()
                k += 1
                if k < len(copied):
                    # Slot k % 2 held tensor k-2, written (synchronously) one iteration ago.
                    pending[copied[k]] = pool.submit(raw.read, copied[k], k % 2)
                put(name, t)
                if on_read is not None:
                    extra = on_read(name, t)
                del t
            for new_name, new_t in (extra or {}).items():
                if new_name in given or new_name not in specs or new_name in reader.infos:
                    raise KeyError(f"on_read produced {new_name!r}, which is not a declared new tensor")
                put(new_name, new_t)
            for new_name in insert_after.get(name, {}):
                if new_name in given:
                    put(new_name, given[new_name])
    return w.total_bytes
