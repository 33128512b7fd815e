"""Regression corpus of hostile and broken files, one case per class of bad input (issue 13).

Every file is generated here. For each: the reader refuses it with the pack's own error type and a
message naming the file and the tensor/layer and what is wrong; the CLI exits 2 with one line, no
traceback and no output; the loaders' path (``ops.prepare_state_dict`` and the layer load) raises
``FormatError``; metadata that names layers the file lacks is never copied into an output.
"""

from __future__ import annotations

import json
import logging
import os
import struct

import pytest
import torch
from convert_helpers import run_cli
from fuzz_seeds import pack

from hybridquant.converter import metadata as qmeta
from hybridquant.converter.errors import ConverterError, InputFileError
from hybridquant.converter.formats import FormatError
from hybridquant.converter.safetensors_io import SafetensorsReader, read_header
from hybridquant.converter.schema import MAX_JSON_DEPTH, json_depth, loads
from hybridquant.ops.quant_data import read_layer
from hybridquant.ops.state_dict import prepare_state_dict

F32_4 = b"\0" * 16


def raw_file(path, header_text: str, data: bytes = b"", length: int | None = None) -> str:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


def entry(dtype="F32", shape=(4,), offs=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


# ---- the safetensors container -------------------------------------------------------------------

HEADER_CASES = {
    "overlapping offsets": (json.dumps({"a": entry(), "b": entry(offs=(8, 24))}), b"\0" * 24, "overlaps"),
    "gap between tensors": (json.dumps({"a": entry(), "b": entry(offs=(20, 36))}), b"\0" * 36, "gap of 4 bytes"),
    "first tensor not at 0": (json.dumps({"a": entry(offs=(4, 20))}), b"\0" * 20, "gap of 4 bytes"),
    "duplicate tensor name": ('{"a": %s, "a": %s}' % (json.dumps(entry()), json.dumps(entry(offs=(16, 32)))),
                              b"\0" * 32, "duplicate key 'a'"),
    "duplicate field in an entry": ('{"a": {"dtype": "F32", "dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}',
                                    F32_4, "duplicate key 'dtype'"),
    "shape holding a boolean": (json.dumps({"a": entry(shape=(True, 4))}), F32_4, "tensor 'a': shape"),
    "shape holding a float": (json.dumps({"a": entry(shape=(4.0,))}), F32_4, "tensor 'a': shape"),
    "negative dimension": (json.dumps({"a": entry(shape=(-4,))}), F32_4, "tensor 'a': shape"),
    "dtype that is a list": (json.dumps({"a": entry(dtype=["F32"])}), F32_4, "unsupported dtype ['F32']"),
    "unknown dtype": (json.dumps({"a": entry(dtype="F33")}), F32_4, "unsupported dtype 'F33'"),
    "offsets that are booleans": (json.dumps({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}),
                                  b"\0", "data_offsets must be two non-negative integers"),
    "offsets reversed": (json.dumps({"a": entry(offs=(16, 0))}), F32_4, "end before they begin"),
    "byte count not dtype x shape": (json.dumps({"a": entry(offs=(0, 12))}), b"\0" * 12, "do not match"),
    "huge shape of a tensor": (json.dumps({"a": entry(shape=(2**62, 2**62))}), F32_4, "do not match"),
    "empty tensor with an absurd dimension": (json.dumps({"a": entry(shape=(0, 2**60), offs=(0, 0))}), b"",
                                              "absurd dimension"),
    "offset past the end": (json.dumps({"a": entry(offs=(0, 2**40))}), F32_4, "truncated"),
    "trailing bytes": (json.dumps({"a": entry()}), F32_4 + b"junk", "4 bytes after the last tensor"),
    "deeply nested header": ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", b"", "nested 100001 levels deep"),
    "deeply nested value in a tensor entry": (json.dumps({"a": dict(entry(), x=0)}).replace("0}", "[" * 5000 + "]" * 5000 + "}"),
                                              F32_4, "levels deep"),
    "NaN literal": ('{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": NaN}}', F32_4,
                    "NaN is not a JSON number"),
    "integer of 5000 digits": ('{"a": {"dtype": "F32", "shape": [%s], "data_offsets": [0, 16]}}' % ("1" * 5000),
                               F32_4, "invalid JSON"),
    "header not an object": ("[1, 2]", b"", "not a safetensors file"),
    "metadata not str -> str": (json.dumps({"__metadata__": {"k": 1}}), b"", "__metadata__ must map strings to strings"),
    "metadata deeply nested": ('{"__metadata__": {"k": ' + "[" * 3000 + "]" * 3000 + "}}", b"", "levels deep"),
    "_quantization_metadata deeply nested": (
        json.dumps({"__metadata__": {"_quantization_metadata": "[" * 50000 + "]" * 50000}}), b"", "levels deep"),
    "_quantization_metadata not JSON": (json.dumps({"__metadata__": {"_quantization_metadata": "{"}}), b"",
                                        "_quantization_metadata: invalid JSON"),
    "_quantization_metadata layers a list": (
        json.dumps({"__metadata__": {"_quantization_metadata": json.dumps({"layers": []})}}), b"",
        "expected a 'layers' object, found a list"),
    "_quantization_metadata format a number": (
        json.dumps({"__metadata__": {"_quantization_metadata": json.dumps({"layers": {"l": {"format": 8}}})}}), b"",
        "layer 'l': format must be a string"),
    "_quantization_metadata duplicate layer": (
        json.dumps({"__metadata__": {"_quantization_metadata": '{"layers": {"l": {}, "l": {}}}'}}), b"",
        "duplicate key 'l'"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_reader_refuses_bad_containers(tmp_path, case):
    text, data, msg = HEADER_CASES[case]
    p = raw_file(tmp_path / "bad.safetensors", text, data)
    with pytest.raises(InputFileError) as e:
        read_header(p)
    assert msg in str(e.value) and str(e.value).startswith(p + ": "), str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400  # one readable line, not a dump


@pytest.mark.parametrize("case", ["overlapping offsets", "duplicate tensor name", "deeply nested header",
                                  "shape holding a boolean", "dtype that is a list", "_quantization_metadata not JSON"])
def test_cli_refuses_bad_containers_without_output(tmp_path, case):
    text, data, msg = HEADER_CASES[case]
    p = raw_file(tmp_path / "bad.safetensors", text, data)
    out = tmp_path / "out.safetensors"
    proc = run_cli("-i", p, "-o", out, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and msg in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]


def test_the_safetensors_package_agrees(tmp_path):
    """The container rules are safetensors' own: files it refuses, we refuse (and the valid one loads)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for case in ("overlapping offsets", "gap between tensors", "trailing bytes", "byte count not dtype x shape"):
        text, data, _ = HEADER_CASES[case]
        p = raw_file(tmp_path / "x.safetensors", text, data)
        with pytest.raises((SafetensorError, Exception)):
            load_file(p)
    p = raw_file(tmp_path / "ok.safetensors", json.dumps({"a": entry(), "b": entry(offs=(16, 32))}), b"\0" * 32)
    assert set(load_file(p)) == set(read_header(p)[0]) == {"a", "b"}


def test_json_rules():
    assert json_depth(b'{"a": "[[[[[[", "b": [[1]]}') == 3  # brackets inside strings are text
    assert json_depth(b'"\\"[[["') == 0
    with pytest.raises(FormatError, match=f"at most {MAX_JSON_DEPTH}"):
        loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "x")
    loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "x")  # the limit itself is fine
    with pytest.raises(FormatError, match="Infinity is not a JSON number"):
        loads('{"a": -Infinity}', "x")


# ---- metadata objects ----------------------------------------------------------------------------

def _fp8_file(path, cq: dict | bytes | None = None, header_layers: dict | None = None, weight=True):
    w = torch.zeros(32, 64, dtype=torch.float8_e4m3fn)
    t = {"l.weight_scale": torch.tensor(1.0)}
    if weight:
        t["l.weight"] = w
    if cq is not None:
        raw = cq if isinstance(cq, bytes) else json.dumps(cq).encode()
        t["l.comfy_quant"] = torch.tensor(list(raw), dtype=torch.uint8)
    md = None
    if header_layers is not None:
        md = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": header_layers})}
    from safetensors.torch import save_file

    save_file(t, str(path), metadata=md)
    return str(path)


def _bnb_file(path, state: dict, weight=True, nested=False):
    n = 64 * 32
    t = {"l.weight.absmax": torch.ones(n // 64) if not nested else torch.zeros(n // 64, dtype=torch.uint8),
         "l.weight.quant_map": torch.zeros(16),
         "l.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)}
    if nested:
        t["l.weight.nested_absmax"] = torch.ones(1)
        t["l.weight.nested_quant_map"] = torch.zeros(256)
    if weight:
        t["l.weight"] = torch.zeros(n // 2, 1, dtype=torch.uint8)
    from safetensors.torch import save_file

    save_file(t, str(path))
    return str(path)


BNB_OK = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 32]}
BNB_NESTED = dict(BNB_OK, nested_blocksize=256, nested_dtype="float32", nested_offset=0.5)

METADATA_CASES = {
    "comfy_quant format a number": (lambda p: _fp8_file(p, {"format": 8}), "format must be a string"),
    "comfy_quant group_size a float": (lambda p: _fp8_file(p, {"format": "int8_blockwise", "group_size": 64.0}),
                                       "group_size must be a positive integer"),
    "comfy_quant group_size a string": (lambda p: _fp8_file(p, {"format": "int8_blockwise", "group_size": "64"}),
                                        "group_size must be a positive integer"),
    "comfy_quant group_size 2^40": (lambda p: _fp8_file(p, {"format": "int8_blockwise", "group_size": 2**40}),
                                    "group_size must be a positive integer (at most 65536)"),
    "comfy_quant orig_shape 2^62": (lambda p: _fp8_file(p, {"format": "mxfp8", "orig_shape": [2**62, 2**62]}),
                                    "orig_shape must be two positive integers"),
    "comfy_quant orig_shape beyond the file": (lambda p: _fp8_file(p, {"format": "mxfp8", "orig_shape": [65536, 65536]}),
                                               "cannot be stored in the 2048 bytes of its weight"),
    "comfy_quant orig_shape with a boolean": (lambda p: _fp8_file(p, {"format": "mxfp8", "orig_shape": [True, 64]}),
                                              "orig_shape must be two positive integers"),
    "comfy_quant per_row a string": (lambda p: _fp8_file(p, {"format": "int8_tensorwise", "per_row": "yes"}),
                                     "per_row must be true or false"),
    "comfy_quant a list": (lambda p: _fp8_file(p, [1, 2]), "expected a JSON object, found a list"),
    "comfy_quant deeply nested": (lambda p: _fp8_file(p, b"[" * 10000 + b"]" * 10000), "levels deep"),
    "comfy_quant duplicate keys": (lambda p: _fp8_file(p, b'{"format": "float8_e4m3fn", "format": "nvfp4"}'),
                                   "duplicate key 'format'"),
    "header orig_shape a string": (lambda p: _fp8_file(p, None, {"l": {"format": "mxfp8", "orig_shape": "64x32"}}),
                                   "orig_shape must be two positive integers"),
    "quant state blocksize a float": (lambda p: _bnb_file(p, dict(BNB_OK, blocksize=64.0)), "blocksize must be one of"),
    "quant state blocksize a list": (lambda p: _bnb_file(p, dict(BNB_OK, blocksize=[64])), "blocksize must be one of"),
    "quant state nested blocksize 2^40": (lambda p: _bnb_file(p, dict(BNB_NESTED, nested_blocksize=2**40), nested=True),
                                          "nested_blocksize must be one of"),
    "quant state nested offset a string": (lambda p: _bnb_file(p, dict(BNB_NESTED, nested_offset="0.5"), nested=True),
                                           "nested_offset must be a finite float32 number"),
    "quant state shape 2^62": (lambda p: _bnb_file(p, dict(BNB_OK, shape=[2**62, 32])), "shape must be"),
    "quant state shape beyond the file": (lambda p: _bnb_file(p, dict(BNB_OK, shape=[64 * 1024, 32 * 1024])),
                                          "cannot be stored in the 1024 bytes of its weight"),
    "quant state dtype a number": (lambda p: _bnb_file(p, dict(BNB_OK, dtype=16)), "dtype must be one of"),
    "quant state type mismatch": (lambda p: _bnb_file(p, dict(BNB_OK, quant_type="fp4")), "quant_type is 'fp4'"),
    "quant state missing shape": (lambda p: _bnb_file(p, {k: v for k, v in BNB_OK.items() if k != "shape"}),
                                  "lacks 'shape'"),
    "quant state without its weight": (lambda p: _bnb_file(p, BNB_OK, weight=False), "no 'l.weight'"),
    "header layer not in the file (ghost)": (lambda p: _fp8_file(p, None, {"l": {"format": "float8_e4m3fn"},
                                                                            "ghost": {"format": "float8_e4m3fn"}}),
                                             "'ghost.weight' is not in the file"),
}


def _discover(path):
    with SafetensorsReader(path) as r:
        return qmeta.discover_layers(list(r.infos), r.metadata, r.read, sizes={n: i.nbytes for n, i in r.infos.items()})


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_metadata_refused_by_every_reader(tmp_path, case):
    make, msg = METADATA_CASES[case]
    p = make(tmp_path / "m.safetensors")
    with pytest.raises((FormatError, ConverterError)) as e:
        _discover(p)
    assert msg in str(e.value), str(e.value)
    with SafetensorsReader(p) as r:
        sd, md = {n: r.read(n) for n in r.infos}, r.metadata
    with pytest.raises((FormatError, ConverterError)) as e:  # the loaders' path
        prepared = prepare_state_dict(sd, md)
        read_layer(prepared, "l.", (32, 64) if "bnb" not in case and "quant state" not in case else (64, 32))
    assert msg in str(e.value) or "l" in str(e.value), str(e.value)


def test_loader_error_is_one_type_naming_the_file(tmp_path, comfy):
    """Through the real loader node code: a ModelLoadError (an InputFileError) with the file's name."""
    from hybridquant.converter.errors import ModelLoadError
    from hybridquant.nodes.backend import load_diffusion_model

    for i, (make, msg) in enumerate([METADATA_CASES["quant state nested blocksize 2^40"],
                                     METADATA_CASES["comfy_quant orig_shape 2^62"]]):
        p = make(tmp_path / f"m{i}.safetensors")
        with pytest.raises(ModelLoadError, match=msg) as e:
            load_diffusion_model(p)
        assert isinstance(e.value, InputFileError) and f"m{i}.safetensors" in str(e.value)
    text, data, msg = HEADER_CASES["duplicate tensor name"]
    p = raw_file(tmp_path / "dup.safetensors", text, data)
    with pytest.raises(ModelLoadError, match=msg):
        load_diffusion_model(p)


# ---- ghost layers --------------------------------------------------------------------------------

def _header_layers(path):
    return json.loads(read_header(path)[1].get("_quantization_metadata", '{"layers": {}}'))["layers"]


def test_convert_drops_ghost_header_layers_with_a_warning(tmp_path, caplog):
    from safetensors.torch import save_file

    src = tmp_path / "in.safetensors"
    md = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {
        "gone": {"format": "float8_e4m3fn"}}}), "modelspec.title": "t"}
    save_file({"a.weight": torch.randn(64, 64, dtype=torch.bfloat16)}, str(src), metadata=md)
    out = tmp_path / "out.safetensors"
    with caplog.at_level(logging.WARNING, logger="hybridquant"):
        proc = run_cli("-i", src, "-o", out, "--fp8", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "gone" not in _header_layers(out) and "a" in _header_layers(out)
    assert read_header(out)[1]["modelspec.title"] == "t"
    assert any("not in the file" in r.getMessage() and "gone" in r.getMessage() for r in caplog.records)


def test_edit_drops_ghost_header_layers_with_a_warning(tmp_path):
    from hybridquant.converter.edit import edit_quant

    src = _fp8_file(tmp_path / "in.safetensors", {"format": "float8_e4m3fn"},
                    {"l": {"format": "float8_e4m3fn"}, "ghost": {"format": "float8_e4m3fn"}})
    rep = edit_quant(src, str(tmp_path / "out.safetensors"), add_keys='{"full_precision_matrix_mult": true}')
    assert set(_header_layers(tmp_path / "out.safetensors")) == {"l"}
    assert any("ghost" in w for w in rep["warnings"])


def test_ghost_comfy_quant_tensor_is_refused(tmp_path):
    src = _fp8_file(tmp_path / "in.safetensors", {"format": "float8_e4m3fn"}, weight=False)
    proc = run_cli("-i", src, "-o", tmp_path / "out.safetensors", check=False)
    assert proc.returncode == 2 and "'l.weight' is not in the file" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_legacy_scale_input_placeholder_loads(tmp_path):
    """Found by the fuzzer's seed check: a legacy file whose scale_input is the 1.0 placeholder."""
    w = torch.randn(32, 64)
    s = w.abs().amax() / 448
    sd = {"l.weight": (w / s).to(torch.float8_e4m3fn), "l.scale_weight": s.reshape(1), "l.scale_input": torch.ones(()),
          "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    prepared = prepare_state_dict(sd, {})
    assert "l.scale_input" not in prepared
    info, tensors = read_layer(prepared, "l.", (32, 64))
    assert info.format == "float8_e4m3fn" and "input_scale" not in tensors


def test_a_valid_file_of_pack_written_bytes_still_reads(tmp_path):
    p = tmp_path / "ok.safetensors"
    p.write_bytes(pack({"a": ("F32", [4], F32_4), "e": ("F32", [0, 3], b"")}, {"k": "v"}))
    infos, md = read_header(p)
    assert list(infos) == ["a", "e"] and md == {"k": "v"}


def test_file_info_route_answers_422_for_every_bad_file(tmp_path, comfy):
    """The route's summary of each corpus file: 422 with the reader's message, no server path, no 500;
    the refusal is cached by (path, size, mtime) and a fixed file is read again."""
    from hybridquant.nodes import routes

    bad = []
    for i, (text, data, msg) in enumerate(HEADER_CASES.values()):
        bad.append((raw_file(tmp_path / f"h{i}.safetensors", text, data), msg))
    for i, (make, msg) in enumerate(METADATA_CASES.values()):
        bad.append((make(tmp_path / f"m{i}.safetensors"), None))  # the summary reads the header only
    for path, msg in bad:
        status, body = routes._summary(path)
        assert status in (200, 422), (path, status, body)
        if msg is not None:
            assert status == 422 and msg in body["error"] and str(tmp_path) not in body["error"], body
    path, _ = bad[0]
    assert routes._summary(path)[0] == 422
    p = tmp_path / "h0.safetensors"
    p.write_bytes(pack({"a": ("F32", [4], F32_4)}, None))
    os.utime(p, ns=(os.stat(p).st_atime_ns, os.stat(p).st_mtime_ns + 10**9))
    status, body = routes._summary(str(p))
    assert status == 200 and body["tensor_count"] == 1
