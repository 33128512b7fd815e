"""Editing the quantization metadata of an existing file (``--edit-quant``) without re-quantizing.

What a layer's quantization metadata is
---------------------------------------
A quantized layer ``L`` may describe itself in two places (ARCHITECTURE.md, "On-disk conventions"):

- the tensor ``L.comfy_quant``: 1-D uint8 holding the UTF-8 JSON of a flat dict ``{"format": ..., ...}``;
- the header entry ``__metadata__["_quantization_metadata"]`` = JSON
  ``{"format_version": "1.0", "layers": {L: {...}}}``.

A file may carry both, only the tensors, or only the header. ``edit_quant`` edits every place that
exists for each selected layer, with the same edit, so tensor and header stay consistent. It never
invents a place that was not there, except that ``save_quant_metadata=True`` (re)builds the header's
``layers`` from the edited per-layer dicts (the ``--save-quant-metadata`` flag). All other header
metadata (``modelspec.*``, the header's other top-level keys) is kept as is.

Output
------
Always a NEW file, written through ``safetensors_writer.AtomicSafetensorsWriter`` (temp file beside the
target, renamed when complete). Every tensor except the edited ``.comfy_quant`` ones is copied
byte for byte, in the input's order. Output equal to the input (same path, symlink or hard link) is
refused: rewriting a multi-GB file costs the same whether it lands beside the input or over it, and
refusing keeps the promise that the input is never replaced. An existing output needs
``overwrite=True``.

Safety: an edit that changes a key deciding how the stored tensors are read (``group_size``,
``per_row``, ``orig_shape``) is checked with the loaders' own validation (``metadata.validate_layer``)
and refused with the layer and the mismatch named. ``format`` can never be edited (``edit_keys.py``).

Flags: the ``--add-keys`` / ``--remove-keys`` / ``--quant-filter`` syntax is in ``edit_keys.py``. A filter
matching none of the file's quantized layers is an error, as is a file without quantized layers.
Keys removed that a layer does not have are counted in the report (``keys_absent``), not an error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

import torch

from .edit_keys import compile_filter, parse_add_keys, parse_remove_keys
from .errors import InputFileError, NoMatchingLayersError, OptionError
from .metadata import QUANT_METADATA_KEY, dumps_compact
from .rewrite import COMFY_QUANT_SUFFIX, CancelFn, ProgressFn, encode_comfy_quant, read_quant_configs, rewrite_file
from .safetensors_io import SafetensorsReader
from .safetensors_writer import check_output_path

# ---------------------------------------------------------------------------------------------------
# --edit-quant
# ---------------------------------------------------------------------------------------------------

# Keys that change how the stored tensors are read: an edit touching them is checked against the data.
STRUCTURAL_KEYS = ("group_size", "per_row", "orig_shape")


def _check_structure(reader: SafetensorsReader, layer: str, old: Mapping, new: Mapping) -> None:
    """Refuse an edit after which the layer's metadata no longer describes its stored tensors.

    Only runs when a structural key changed (it reads the layer's tensors). The check is the loaders'
    own (``metadata.discover_layers`` + ``validate_layer``) on the edited dict."""
    if all((k in old) == (k in new) and old.get(k) == new.get(k) for k in STRUCTURAL_KEYS):
        return
    from .formats import FormatError
    from .metadata import discover_layers, load_layer_tensors, validate_layer

    cq = layer + COMFY_QUANT_SUFFIX
    encoded = encode_comfy_quant(new)
    keys = [n for n in reader.infos if n.startswith(layer + ".") and n != cq] + [cq]

    def get(k: str) -> torch.Tensor:
        return encoded if k == cq else reader.read(k)

    try:
        info = discover_layers(keys, None, get)[layer]
        # Removing orig_shape does not change the logical shape: validate against the one it stated.
        shape = None if "orig_shape" in new else old.get("orig_shape")
        validate_layer(info, load_layer_tensors(info, get), shape)
    except (FormatError, KeyError) as e:
        changed = [k for k in STRUCTURAL_KEYS if (k in old) != (k in new) or old.get(k) != new.get(k)]
        raise OptionError(f"{reader.path}: editing {', '.join(changed)} of layer {layer} would make its metadata "
                          f"disagree with its stored tensors: {e}") from None




def _new_counts() -> dict:
    return {"added": {}, "updated": {}, "removed": {}, "absent": {}}


def _apply(cfg: dict, add: Mapping, remove: Iterable[str], counts: dict) -> dict:
    new = dict(cfg)
    for k in remove:
        if k in new:
            del new[k]
            counts["removed"][k] = counts["removed"].get(k, 0) + 1
        else:
            counts["absent"][k] = counts["absent"].get(k, 0) + 1
    for k, v in add.items():
        if k not in new:
            counts["added"][k] = counts["added"].get(k, 0) + 1
        elif new[k] != v or type(new[k]) is not type(v):
            counts["updated"][k] = counts["updated"].get(k, 0) + 1
        new[k] = v
    return new


def edit_quant(input: str, output: str, add_keys: str | Mapping | None = None, remove_keys: str | Iterable[str] | None = None,
               quant_filter: str | None = None, overwrite: bool = False, *, save_quant_metadata: bool = False,
               progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> dict:
    """Edit the ``.comfy_quant`` dicts (tensors and header) of the selected layers into a new file.

    Returns a JSON-serializable report. Raises ``OptionError`` (bad flags/regex/keys),
    ``NoMatchingLayersError`` (no quantized layer, or none matching the filter), ``InputFileError`` /
    ``OutputFileError`` (files)."""
    t0 = time.perf_counter()
    input, output = os.fspath(input), os.fspath(output)
    add = parse_add_keys(add_keys)
    remove = parse_remove_keys(remove_keys)
    overlap = sorted(set(add) & set(remove))
    if overlap:
        raise OptionError(f"--add-keys and --remove-keys both name {', '.join(overlap)}")
    if not add and not remove and not save_quant_metadata:
        raise OptionError("--edit-quant needs --add-keys, --remove-keys or --save-quant-metadata")
    pattern = compile_filter(quant_filter)
    with SafetensorsReader(input) as reader:
        check_output_path(input, output, overwrite)
        cfgs = read_quant_configs(reader, input)
        tensor_cfgs, qm, header_layers, warnings = cfgs.tensors, cfgs.header, cfgs.header_layers, cfgs.warnings
        all_layers = cfgs.layers()
        if not all_layers:
            raise NoMatchingLayersError(f"{input}: no quantized layers (no .comfy_quant tensors and no {QUANT_METADATA_KEY} header entries) to edit")
        selected = [L for L in all_layers if pattern is None or pattern.search(L)]
        if not selected:
            raise NoMatchingLayersError(f"--quant-filter {quant_filter!r} matches none of the {len(all_layers)} quantized layers of {input} "
                                        f"(e.g. {', '.join(all_layers[:3])})")
        for L in selected:
            if "format" not in tensor_cfgs.get(L, {"format": 0}) or "format" not in header_layers.get(L, {"format": 0}):
                raise InputFileError(f"{input}: layer {L}: quantization metadata has no 'format' key")
            cfgs.format_of(L)  # tensor and header must agree

        counts = _new_counts()
        replace: dict[str, torch.Tensor] = {}
        tensors_changed = header_changed = 0
        final_cfgs: dict[str, dict] = {}
        for L in selected:
            # Key counts are per layer: when a layer has both a tensor and a header entry, the tensor's
            # edit is the one counted (the header gets the same edit).
            new_t = _apply(tensor_cfgs[L], add, remove, counts) if L in tensor_cfgs else None
            new_h = _apply(header_layers[L], add, remove, _new_counts() if new_t is not None else counts) \
                if L in header_layers else None
            final_cfgs[L] = new_t if new_t is not None else new_h
            _check_structure(reader, L, tensor_cfgs.get(L) or header_layers[L], final_cfgs[L])
            # Compare JSON text, not dicts: 1 == 1.0 == True in Python but not in the file.
            if new_t is not None and dumps_compact(new_t) != dumps_compact(tensor_cfgs[L]):
                replace[L + COMFY_QUANT_SUFFIX] = encode_comfy_quant(new_t)
                tensors_changed += 1
            if new_h is not None:
                if dumps_compact(new_h) != dumps_compact(header_layers[L]):
                    header_changed += 1
                header_layers[L] = new_h

        metadata = dict(reader.metadata)
        header_written = False
        if save_quant_metadata:
            # --save-quant-metadata: the header lists every layer, edited or not, from its tensor when
            # it has one (the tensor is what loaders that get custom ops read first).
            layers_out = {L: dict(header_layers.get(L, {})) for L in header_layers}
            for L, cfg in tensor_cfgs.items():
                layers_out[L] = final_cfgs.get(L, cfg)
            new_qm = dict(qm) if qm is not None else {"format_version": "1.0"}
            new_qm["layers"] = layers_out
            metadata[QUANT_METADATA_KEY] = dumps_compact(new_qm)
            header_written = metadata.get(QUANT_METADATA_KEY) != reader.metadata.get(QUANT_METADATA_KEY)
        elif qm is not None and (header_changed or warnings):  # edited, or ghost layers dropped
            new_qm = dict(qm)
            new_qm["layers"] = header_layers
            metadata[QUANT_METADATA_KEY] = dumps_compact(new_qm)
            header_written = True

        nbytes = rewrite_file(reader, output, replace=replace, metadata=metadata, overwrite=overwrite,
                              progress=progress, cancel=cancel)
    return {
        "mode": "edit_quant",
        "input": input,
        "output": os.path.abspath(output),
        "quant_filter": quant_filter,
        "add_keys": add,
        "remove_keys": remove,
        "layers_quantized": len(all_layers),
        "layers_selected": len(selected),
        "comfy_quant_tensors_changed": tensors_changed,
        "header_entries_changed": header_changed,
        "header_updated": header_written,
        "keys_added": counts["added"],
        "keys_updated": counts["updated"],
        "keys_removed": counts["removed"],
        "keys_absent": counts["absent"],
        "warnings": warnings,
        "bytes_written": nbytes,
        "seconds": round(time.perf_counter() - t0, 3),
    }


__all__ = ["edit_quant", "parse_add_keys", "parse_remove_keys", "compile_filter"]
