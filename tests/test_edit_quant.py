"""``--edit-quant``: editing ``.comfy_quant`` tensors and the ``_quantization_metadata`` header.

Input files are built with the real codecs and written with the ``safetensors`` package itself (not
with the code under test); outputs are read back with ``safetensors.safe_open`` and raw bytes hashed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import convert_helpers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hybridquant.converter.edit import edit_quant
from hybridquant.converter.edit_keys import parse_add_keys, parse_remove_keys
from hybridquant.converter.errors import Cancelled, InputFileError, NoMatchingLayersError, OptionError, OutputFileError
from hybridquant.converter.formats import get_codec
from hybridquant.converter.metadata import discover_layers, load_layer_tensors, validate_layer

QM = "_quantization_metadata"
LAYERS = {  # layer -> (format, shape)
    "blocks.0.attn.qkv": ("float8_e4m3fn", (96, 64)),
    "blocks.0.mlp.fc1": ("int8_tensorwise", (64, 64)),
    "blocks.1.attn.qkv": ("float8_e4m3fn", (96, 64)),
}


def cq_tensor(cfg: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(cfg, separators=(",", ":")).encode("utf-8")), dtype=torch.uint8)


def cq_decode(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()))


def build(path, *, tensors_cq=True, header=True, extra_meta=True, seed=0) -> dict:
    """A small mixed FP8/INT8 checkpoint. Returns the per-layer configs written."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    cfgs = {}
    for layer, (fmt, shape) in LAYERS.items():
        w = torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)
        for suffix, t in get_codec(fmt).quantize(w).items():
            tensors[f"{layer}.{suffix}"] = t
        tensors[f"{layer}.bias"] = torch.randn(shape[0], generator=g).to(torch.bfloat16)
        cfg = {"format": fmt, "orig_dtype": "bfloat16", "orig_shape": list(shape)}
        cfgs[layer] = cfg
        if tensors_cq:
            tensors[f"{layer}.comfy_quant"] = cq_tensor(cfg)
    tensors["final_norm.weight"] = torch.randn(64, generator=g).to(torch.float16)
    meta = {}
    if extra_meta:
        meta["modelspec.title"] = "test model, \"quoted\""
    if header:
        meta[QM] = json.dumps({"format_version": "1.0", "layers": cfgs})
    save_file(tensors, str(path), metadata=meta or None)
    return cfgs


def raw_hashes(path) -> dict[str, str]:
    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest() + str(t.dtype) + str(tuple(t.shape))
    return out


def file_hash(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def read_out(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        cqs = {k[: -len(".comfy_quant")]: cq_decode(f.get_tensor(k)) for k in f.keys() if k.endswith(".comfy_quant")}
        keys = list(f.keys())
    header = json.loads(meta[QM]) if QM in meta else None
    return cqs, header, meta, keys


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "model.safetensors"
    cfgs = build(p)
    return p, cfgs


def assert_others_identical(src_path, out_path, edited: set[str]):
    a, b = raw_hashes(src_path), raw_hashes(out_path)
    assert set(a) == set(b)
    for k in a:
        if k.endswith(".comfy_quant") and k[: -len(".comfy_quant")] in edited:
            continue
        assert a[k] == b[k], k


# ------------------------------------------------------------------------------------------------
# --add-keys
# ------------------------------------------------------------------------------------------------

def test_add_json_object_with_commas_and_quotes(src, tmp_path):
    p, cfgs = src
    before = file_hash(p)
    out = tmp_path / "out.safetensors"
    rep = edit_quant(p, out, add_keys='{"full_precision_matrix_mult": true, "note": "a, \\"b\\", c"}')
    cqs, header, meta, _ = read_out(out)
    for layer, cfg in cfgs.items():
        want = dict(cfg, full_precision_matrix_mult=True, note='a, "b", c')
        assert cqs[layer] == want
        assert header["layers"][layer] == want
    assert header["format_version"] == "1.0"
    assert meta["modelspec.title"] == 'test model, "quoted"'
    assert_others_identical(p, out, set(cfgs))
    assert file_hash(p) == before
    assert rep["layers_selected"] == 3 and rep["comfy_quant_tensors_changed"] == 3
    assert rep["header_entries_changed"] == 3 and rep["header_updated"]
    assert rep["keys_added"] == {"full_precision_matrix_mult": 3, "note": 3}
    # The loaders' view (metadata.py) of the edited file agrees, and every layer still validates.
    with safe_open(str(out), "pt") as f:
        infos = discover_layers(list(f.keys()), f.metadata(), f.get_tensor)
        for layer, (fmt, shape) in LAYERS.items():
            assert infos[layer].format == fmt and infos[layer].comfy_quant() == cqs[layer]
            validate_layer(infos[layer], load_layer_tensors(infos[layer], f.get_tensor), shape)
    # The data of the edited layers still decodes exactly as before (only metadata moved).
    with safe_open(str(p), "pt") as a, safe_open(str(out), "pt") as b:
        for layer, (fmt, shape) in LAYERS.items():
            ta = {s: a.get_tensor(f"{layer}.{s}") for s in ("weight", "weight_scale")}
            tb = {s: b.get_tensor(f"{layer}.{s}") for s in ("weight", "weight_scale")}
            codec = get_codec(fmt)
            assert torch.equal(codec.dequantize(ta, shape), codec.dequantize(tb, shape))


def test_add_key_value_pairs_update_and_types(src, tmp_path):
    p, cfgs = src
    out = tmp_path / "out.safetensors"
    rep = edit_quant(p, out, add_keys='orig_dtype=float16, note="x, y", tag=\'it\\\'s\', ratio=0.5, n=3, items=[1, "a,b"]')
    cqs, header, _, _ = read_out(out)
    for layer, cfg in cfgs.items():
        want = dict(cfg, orig_dtype="float16", note="x, y", tag="it's", ratio=0.5, n=3, items=[1, "a,b"])
        assert cqs[layer] == want == header["layers"][layer]
    assert rep["keys_updated"] == {"orig_dtype": 3}
    assert rep["keys_added"] == {"note": 3, "tag": 3, "ratio": 3, "n": 3, "items": 3}


def test_add_peer_syntax(src, tmp_path):
    p, cfgs = src
    out = tmp_path / "out.safetensors"
    edit_quant(p, out, add_keys="'full_precision_matrix_mult': true, 'group_size': 64")
    cqs, header, _, _ = read_out(out)
    assert all(c["full_precision_matrix_mult"] is True and c["group_size"] == 64 for c in cqs.values())
    assert header["layers"] == cqs


def test_add_then_remove_round_trip(src, tmp_path):
    p, cfgs = src
    mid, out = tmp_path / "mid.safetensors", tmp_path / "out.safetensors"
    edit_quant(p, mid, add_keys="full_precision_matrix_mult=true, note='a, b'")
    rep = edit_quant(mid, out, remove_keys="full_precision_matrix_mult, note, never_there")
    cqs, header, _, _ = read_out(out)
    assert cqs == cfgs and header["layers"] == cfgs
    assert rep["keys_removed"] == {"full_precision_matrix_mult": 3, "note": 3}
    assert rep["keys_absent"] == {"never_there": 3}
    # Back to the original .comfy_quant bytes too (same JSON text), so the whole tensor set matches.
    assert raw_hashes(out) == raw_hashes(p)


def test_remove_keeps_other_keys_and_header_consistent(src, tmp_path):
    p, cfgs = src
    out = tmp_path / "out.safetensors"
    edit_quant(p, out, remove_keys="orig_shape")
    cqs, header, _, _ = read_out(out)
    for layer, cfg in cfgs.items():
        want = {k: v for k, v in cfg.items() if k != "orig_shape"}
        assert cqs[layer] == want == header["layers"][layer]


def test_structural_edits_checked_against_the_data(src, tmp_path):
    """Keys that change how tensors are read (per_row, orig_shape, group_size) must fit the stored data."""
    p, cfgs = src
    out = tmp_path / "out.safetensors"
    with pytest.raises(OptionError, match=r"editing per_row of layer blocks\.0\.mlp\.fc1 would make its metadata disagree"):
        edit_quant(p, out, add_keys="per_row=true", quant_filter="mlp")
    with pytest.raises(OptionError, match=r"editing orig_shape of layer blocks\.0\.attn\.qkv.*\(32, 64\)"):
        edit_quant(p, out, add_keys="orig_shape=[32, 64]", quant_filter="attn")
    assert not out.exists()
    # Consistent structural edits go through (tensorwise layers ignore group_size; orig_shape may go).
    edit_quant(p, out, add_keys="orig_shape=[96, 64]", quant_filter="attn")
    assert all(c["orig_shape"] == [96, 64] for L, c in read_out(out)[0].items() if "attn" in L)


def test_quant_filter_selects_layers(src, tmp_path):
    p, cfgs = src
    out = tmp_path / "out.safetensors"
    rep = edit_quant(p, out, add_keys="full_precision_matrix_mult=true", quant_filter=r"attn\.qkv$")
    cqs, header, _, _ = read_out(out)
    assert rep["layers_selected"] == 2
    assert cqs["blocks.0.mlp.fc1"] == cfgs["blocks.0.mlp.fc1"] == header["layers"]["blocks.0.mlp.fc1"]
    for layer in ("blocks.0.attn.qkv", "blocks.1.attn.qkv"):
        assert cqs[layer]["full_precision_matrix_mult"] is True
        assert header["layers"][layer] == cqs[layer]
    assert_others_identical(p, out, {"blocks.0.attn.qkv", "blocks.1.attn.qkv"})


def test_invalid_regex_and_no_match(src, tmp_path):
    p, _ = src
    out = tmp_path / "out.safetensors"
    with pytest.raises(OptionError, match=r"--quant-filter.*invalid regular expression"):
        edit_quant(p, out, add_keys="a=1", quant_filter="attn[")
    with pytest.raises(NoMatchingLayersError, match="matches none of the 3 quantized layers"):
        edit_quant(p, out, add_keys="a=1", quant_filter="^nothing$")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# Files with only tensors or only a header
# ------------------------------------------------------------------------------------------------

def test_header_only_file(tmp_path):
    p = tmp_path / "h.safetensors"
    cfgs = build(p, tensors_cq=False)
    out = tmp_path / "out.safetensors"
    rep = edit_quant(p, out, add_keys="full_precision_matrix_mult=true", remove_keys="orig_dtype")
    cqs, header, meta, keys = read_out(out)
    assert cqs == {} and not any(k.endswith(".comfy_quant") for k in keys)
    for layer, cfg in cfgs.items():
        want = {k: v for k, v in cfg.items() if k != "orig_dtype"}
        want["full_precision_matrix_mult"] = True
        assert header["layers"][layer] == want
    assert meta["modelspec.title"] == 'test model, "quoted"'
    assert raw_hashes(out) == raw_hashes(p)
    assert rep["comfy_quant_tensors_changed"] == 0 and rep["header_entries_changed"] == 3
    assert rep["keys_added"] == {"full_precision_matrix_mult": 3}


def test_tensors_only_file_keeps_no_header_unless_asked(tmp_path):
    p = tmp_path / "t.safetensors"
    cfgs = build(p, header=False)
    out = tmp_path / "out.safetensors"
    edit_quant(p, out, add_keys="full_precision_matrix_mult=true")
    cqs, header, meta, _ = read_out(out)
    assert header is None and meta == {"modelspec.title": 'test model, "quoted"'}
    assert all(cqs[L] == dict(c, full_precision_matrix_mult=True) for L, c in cfgs.items())
    out2 = tmp_path / "out2.safetensors"
    rep = edit_quant(out, out2, save_quant_metadata=True)  # --save-quant-metadata alone: build the header
    cqs2, header2, _, _ = read_out(out2)
    assert rep["header_updated"] and header2["layers"] == cqs2 == cqs
    assert header2["format_version"] == "1.0"


def test_file_without_quantized_layers(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"a.weight": torch.ones(4, 4)}, str(p))
    with pytest.raises(NoMatchingLayersError, match="no quantized layers"):
        edit_quant(p, tmp_path / "o.safetensors", add_keys="x=1")


def test_inconsistent_tensor_and_header_formats_refused(tmp_path):
    p = tmp_path / "bad.safetensors"
    build(p)
    with safe_open(str(p), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    qm = json.loads(meta[QM])
    qm["layers"]["blocks.0.attn.qkv"]["format"] = "mxfp8"
    meta[QM] = json.dumps(qm)
    save_file(tensors, str(p), metadata=meta)
    with pytest.raises(InputFileError, match=r"blocks\.0\.attn\.qkv.*'float8_e4m3fn'.*'mxfp8'"):
        edit_quant(p, tmp_path / "o.safetensors", add_keys="x=1")


def test_corrupt_comfy_quant_names_layer(tmp_path):
    p = tmp_path / "bad.safetensors"
    save_file({"l.weight": torch.ones(2, 2), "l.comfy_quant": torch.tensor(list(b"{not json"), dtype=torch.uint8)}, str(p))
    with pytest.raises(InputFileError, match=r"l\.comfy_quant: not UTF-8 JSON"):
        edit_quant(p, tmp_path / "o.safetensors", add_keys="x=1")


# ------------------------------------------------------------------------------------------------
# Output handling
# ------------------------------------------------------------------------------------------------

def test_existing_output_refused_without_overwrite(src, tmp_path):
    p, _ = src
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputFileError, match="exists"):
        edit_quant(p, out, add_keys="x=1")
    assert out.read_bytes() == b"keep me"
    edit_quant(p, out, add_keys="x=1", overwrite=True)
    assert all(c["x"] == 1 for c in read_out(out)[0].values())


def test_output_equal_to_input_refused(src, tmp_path):
    p, _ = src
    before = file_hash(p)
    for target in (p, tmp_path / "." / p.name):
        with pytest.raises(OutputFileError, match="output is the input"):
            edit_quant(p, target, add_keys="x=1", overwrite=True)
    link = tmp_path / "link.safetensors"
    os.symlink(p, link)
    with pytest.raises(OutputFileError, match="output is the input"):
        edit_quant(p, link, add_keys="x=1", overwrite=True)
    assert file_hash(p) == before


def test_cancel_leaves_no_output(src, tmp_path):
    p, _ = src
    out = tmp_path / "out.safetensors"
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        edit_quant(p, out, add_keys="x=1", cancel=cancel)
    assert not out.exists()
    assert [f for f in os.listdir(tmp_path) if "partial" in f] == []


def test_bad_input_files(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        edit_quant(tmp_path / "missing.safetensors", tmp_path / "o.safetensors", add_keys="x=1")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(InputFileError, match="not a safetensors file"):
        edit_quant(junk, tmp_path / "o.safetensors", add_keys="x=1")
    assert not (tmp_path / "o.safetensors").exists()


def test_sigint_mid_write_leaves_no_output(src, tmp_path):
    """A real SIGINT (Ctrl+C) delivered while the output is half written: no output, input intact."""
    import signal

    p, _ = src
    before = file_hash(p)
    out = tmp_path / "out.safetensors"
    sent = []

    def progress(done, total, name):
        if not sent and done < total:
            sent.append(name)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        edit_quant(p, out, add_keys="x=1", progress=progress)
    assert sent and not out.exists()
    assert [f for f in os.listdir(tmp_path) if "partial" in f] == []
    assert file_hash(p) == before


def test_needs_an_edit(src, tmp_path):
    p, _ = src
    with pytest.raises(OptionError, match="needs --add-keys"):
        edit_quant(p, tmp_path / "o.safetensors")
    with pytest.raises(OptionError, match="both name"):
        edit_quant(p, tmp_path / "o.safetensors", add_keys="x=1", remove_keys="x")


# ------------------------------------------------------------------------------------------------
# The flag syntax itself
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,want", [
    ('{"full_precision_matrix_mult": true, "note": "a, \\"b\\""}', {"full_precision_matrix_mult": True, "note": 'a, "b"'}),
    ('full_precision_matrix_mult=true,note="a, b"', {"full_precision_matrix_mult": True, "note": "a, b"}),
    ("note='it\\'s, \"fine\"'", {"note": 'it\'s, "fine"'}),
    ("'a': True, 'b': None, 'c': 'x'", {"a": True, "b": None, "c": "x"}),
    ("{'a': 1.5e-3,}", {"a": 0.0015}),
    ("orig_shape=[3072, 64], x = plain words ", {"orig_shape": [3072, 64], "x": "plain words"}),
    ('"quoted key"=1', {"quoted key": 1}),
    ("a=-2, b=FALSE, c=null", {"a": -2, "b": False, "c": None}),
])
def test_parse_add_keys(spec, want):
    got = parse_add_keys(spec)
    assert got == want
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}


@pytest.mark.parametrize("spec,msg", [
    ("format=mxfp8", "refusing to set 'format'"),
    ("a", "expected '=' or ':'"),
    ("a=", "missing value"),
    ("a=1,a=2", "given twice"),
    ("{a=1", "missing closing"),
    ("a=it's", "quote the whole value"),
    ('a="unterminated', "bad double-quoted string"),
    ("a='unterminated", "unterminated single-quoted"),
    ("a={\"b\": 1}", "nested objects"),
    ("group_size=0", "positive integer"),
    ('full_precision_matrix_mult="true"', "true or false"),
    ("orig_shape=[0, 3]", "list of positive integers"),
    ("   ", "empty"),
    ("a=1 b=2, c", "expected '=' or ':'"),
])
def test_parse_add_keys_errors(spec, msg):
    with pytest.raises(OptionError, match=msg):
        parse_add_keys(spec)


def test_parse_remove_keys():
    assert parse_remove_keys(" a, b ,a,,") == ["a", "b"]
    with pytest.raises(OptionError, match="refusing to remove 'format'"):
        parse_remove_keys("note,format")
    with pytest.raises(OptionError, match="names no keys"):
        parse_remove_keys(" , ")


# ------------------------------------------------------------------------------------------------
# Through the convert_to_quant CLI (a real FP8 file made by the CLI itself)
# ------------------------------------------------------------------------------------------------

# the shared CLI runner (tests/convert_helpers.py); these tests check the exit code themselves
run_cli = functools.partial(convert_helpers.run_cli, check=False)


def test_cli_edit_quant_end_to_end(tmp_path):
    g = torch.Generator().manual_seed(3)
    src = tmp_path / "model.safetensors"
    save_file({"blk.0.attn.weight": (torch.randn(64, 128, generator=g) * 0.05).to(torch.bfloat16),
               "blk.0.attn.bias": torch.zeros(64, dtype=torch.bfloat16),
               "blk.1.mlp.weight": torch.randn(96, 64, generator=g).to(torch.bfloat16)}, str(src),
              metadata={"modelspec.title": "cli"})
    q = tmp_path / "fp8.safetensors"
    r = run_cli("-i", src, "-o", q, "--simple", "-q")
    assert r.returncode == 0, r.stderr
    q_before = file_hash(q)
    base_cqs, base_header, _, _ = read_out(q)
    assert base_cqs["blk.0.attn"]["format"] == "float8_e4m3fn"

    e1 = tmp_path / "edited.safetensors"
    r = run_cli("-i", q, "-o", e1, "--edit-quant", "--add-keys", '{"full_precision_matrix_mult": true, "note": "a, \\"b\\""}',
                "--quant-filter", r"attn$", "-q", subprocess_=True)
    assert r.returncode == 0, r.stderr
    cqs, header, meta, _ = read_out(e1)
    want = dict(base_cqs["blk.0.attn"], full_precision_matrix_mult=True, note='a, "b"')
    assert cqs["blk.0.attn"] == want == header["layers"]["blk.0.attn"]
    assert cqs["blk.1.mlp"] == base_cqs["blk.1.mlp"] == header["layers"]["blk.1.mlp"]
    assert meta["modelspec.title"] == "cli"
    assert_others_identical(q, e1, {"blk.0.attn"})
    assert file_hash(q) == q_before

    e2 = tmp_path / "restored.safetensors"
    r = run_cli("-i", e1, "-o", e2, "--edit_quant", "--remove_keys", "note, full_precision_matrix_mult", "-q")
    assert r.returncode == 0, r.stderr
    assert raw_hashes(e2) == raw_hashes(q)
    assert read_out(e2)[1] == base_header

    # A file converted without the header gets one from its .comfy_quant tensors (--save-quant-metadata).
    nh, nh_edit = tmp_path / "noheader.safetensors", tmp_path / "noheader_edit.safetensors"
    r = run_cli("-i", src, "-o", nh, "--simple", "--no-quant-metadata", "-q")
    assert r.returncode == 0 and read_out(nh)[1] is None, r.stderr
    r = run_cli("-i", nh, "-o", nh_edit, "--edit-quant", "--save-quant-metadata", "-q")
    assert r.returncode == 0, r.stderr
    assert read_out(nh_edit)[1] == base_header and raw_hashes(nh_edit) == raw_hashes(nh)

    r = run_cli("-i", q, "-o", tmp_path / "x.safetensors", "--edit-quant", "--add-keys", "a=1", "--quant-filter", "attn(")
    assert r.returncode == 2 and "invalid regular expression" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("-i", q, "-o", e1, "--edit-quant", "--add-keys", "a=1")
    assert r.returncode == 2 and "exists" in r.stderr
    r = run_cli("-i", q, "-o", q, "--edit-quant", "--remove-keys", "format", "--overwrite")
    assert r.returncode == 2 and "refusing to remove 'format'" in r.stderr
    assert file_hash(q) == q_before
