"""converter.metadata: .comfy_quant codec, header, layer discovery (ours, header-only, bitsandbytes,
legacy scaled-FP8) and validation. Files are written and read with the real ``safetensors`` library;
bitsandbytes keys come from bitsandbytes itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hybridquant.converter import metadata as md
from hybridquant.converter.formats import FormatError, get_codec


def u8(s: str | bytes) -> torch.Tensor:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return torch.tensor(list(b), dtype=torch.uint8)


def write_and_discover(tmp_path, tensors, metadata=None):
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        layers = md.discover_layers(list(f.keys()), meta, f.get_tensor)
        loaded = {name: md.load_layer_tensors(info, f.get_tensor) for name, info in layers.items()}
    return layers, loaded, meta


def quantized_layer(name, fmt, shape=(16, 32), **opts):
    codec = get_codec(fmt)
    out = codec.quantize(torch.randn(shape), **opts)
    return {f"{name}.{k}": v for k, v in out.items()}, codec.metadata(**opts)


# ---- .comfy_quant ------------------------------------------------------------------------------

def test_comfy_quant_round_trip_and_stock_reader():
    d = {"format": "int8_blockwise", "group_size": 64, "orig_dtype": "bfloat16", "orig_shape": [10, 20]}
    t = md.encode_comfy_quant(d)
    assert t.dtype == torch.uint8 and t.ndim == 1
    assert json.loads(bytes(t.tolist())) == d  # the reader ComfyUI and others use
    assert bytes(t.tolist()) == b'{"format":"int8_blockwise","group_size":64,"orig_dtype":"bfloat16","orig_shape":[10,20]}'
    assert md.decode_comfy_quant(t, "L") == d


def test_comfy_quant_keeps_extra_fields():
    d = {"format": "float8_e4m3fn", "full_precision_matrix_mult": True, "tool": "other", "nested": {"a": [1, 2]}}
    assert md.decode_comfy_quant(u8(json.dumps(d)), "L") == d


@pytest.mark.parametrize("payload, message", [
    (b'{"format": "float8_e4m3fn"', r"blk\.1\.comfy_quant: invalid JSON"),
    (b"\xff\xfe", r"blk\.1\.comfy_quant: invalid JSON"),
    (b'["float8_e4m3fn"]', r"blk\.1\.comfy_quant: expected a JSON object"),
    (b'{"group_size": 32}', r"blk\.1\.comfy_quant: no 'format' field"),
    (b'{"format": "float9_e9"}', r"blk\.1\.comfy_quant: unknown quantization format 'float9_e9'"),
    (b'{"format": "int8_blockwise", "group_size": "32"}', r"blk\.1\.comfy_quant: group_size must be a positive integer"),
    (b'{"format": "int8_tensorwise", "per_row": 1}', r"blk\.1\.comfy_quant: per_row must be true or false"),
    (b'{"format": "mxfp8", "orig_shape": [3]}', r"blk\.1\.comfy_quant: orig_shape must be two positive integers"),
])
def test_comfy_quant_errors_name_the_layer(payload, message):
    with pytest.raises(FormatError, match=message):
        md.decode_comfy_quant(u8(payload), "blk.1")


def test_comfy_quant_wrong_tensor_type():
    with pytest.raises(FormatError, match=r"L\.comfy_quant: expected a 1-D uint8 tensor"):
        md.decode_comfy_quant(torch.zeros(3, dtype=torch.int8), "L")
    with pytest.raises(FormatError, match="unknown quantization format"):
        md.encode_comfy_quant({"format": "nope"})


# ---- header --------------------------------------------------------------------------------------

def test_header_round_trip_keeps_other_metadata():
    base = {"modelspec.title": "x", "_quantization_metadata": '{"layers": {}}'}
    layers = {"a.b": {"format": "float8_e4m3fn"}, "c": {"format": "int8_tensorwise", "per_row": True}}
    h = md.build_header(layers, base)
    assert h["modelspec.title"] == "x"
    doc = json.loads(h["_quantization_metadata"])
    assert doc == {"format_version": "1.0", "layers": layers}
    assert md.parse_header(h) == layers
    assert "_quantization_metadata" not in md.build_header({}, base)  # nothing quantized: no header
    assert md.parse_header(None) == {} and md.parse_header({"other": "1"}) == {}


def test_header_tolerates_extra_fields_and_rejects_bad_ones():
    doc = {"format_version": "1.0", "writer": "tool", "layers": {"x": {"format": "nvfp4", "tool_note": 3}}}
    assert md.parse_header({"_quantization_metadata": json.dumps(doc)}) == {"x": {"format": "nvfp4", "tool_note": 3}}
    with pytest.raises(FormatError, match="_quantization_metadata: invalid JSON"):
        md.parse_header({"_quantization_metadata": "{not json"})
    with pytest.raises(FormatError, match="'layers' object"):
        md.parse_header({"_quantization_metadata": '{"format_version": "1.0"}'})
    with pytest.raises(FormatError, match="header layer x: unknown quantization format 'fp3'"):
        md.parse_header({"_quantization_metadata": '{"layers": {"x": {"format": "fp3"}}}'})
    with pytest.raises(FormatError, match="header layer x: no 'format' field"):
        md.parse_header({"_quantization_metadata": '{"layers": {"x": {}}}'})
    with pytest.raises(FormatError, match="strings to strings"):
        md.build_header({}, {"a": 1})


# ---- discovery -----------------------------------------------------------------------------------

def test_discover_our_files_with_tensor_and_header(tmp_path):
    t1, m1 = quantized_layer("blocks.0.attn.qkv", "float8_e4m3fn", input_scale=0.5)
    t2, m2 = quantized_layer("blocks.0.attn", "int8_blockwise", (40, 24), group_size=16)
    tensors = {**t1, **t2, "blocks.0.attn.qkv.bias": torch.zeros(16), "blocks.0.norm.weight": torch.ones(8),
               "blocks.0.attn.qkv.comfy_quant": md.encode_comfy_quant(m1),
               "blocks.0.attn.comfy_quant": md.encode_comfy_quant(m2)}
    header = md.build_header({"blocks.0.attn.qkv": m1, "blocks.0.attn": m2}, {"modelspec.title": "t"})
    layers, loaded, meta = write_and_discover(tmp_path, tensors, header)
    assert set(layers) == {"blocks.0.attn.qkv", "blocks.0.attn"}
    qkv = layers["blocks.0.attn.qkv"]
    assert (qkv.format, qkv.source) == ("float8_e4m3fn", "comfy_quant")
    assert qkv.tensors == {"weight": "blocks.0.attn.qkv.weight", "weight_scale": "blocks.0.attn.qkv.weight_scale",
                           "input_scale": "blocks.0.attn.qkv.input_scale"}
    # the parent layer does not swallow its child's keys
    attn = layers["blocks.0.attn"]
    assert set(attn.tensors) == {"weight", "weight_scale"} and attn.options == {"group_size": 16}
    for name, info in layers.items():
        md.validate_layer(info, loaded[name])
    assert meta["modelspec.title"] == "t"


def test_discover_header_only_file(tmp_path):
    t1, m1 = quantized_layer("x.lin", "float8_e4m3fn_blockwise", (70, 50), group_size=32)
    m1 = {**m1, "orig_dtype": "bfloat16", "writer_extra": True}
    layers, loaded, _ = write_and_discover(tmp_path, {**t1, "x.other.weight": torch.ones(3, 3)},
                                           md.build_header({"x.lin": m1}))
    info = layers["x.lin"]
    assert (info.source, info.format, info.meta) == ("header", "float8_e4m3fn_blockwise", m1)
    assert info.comfy_quant() == m1
    md.validate_layer(info, loaded["x.lin"])
    md.validate_layer(info, loaded["x.lin"], shape=(70, 50))
    with pytest.raises(FormatError, match=r"x\.lin\.weight: expected shape \(70, 51\)"):
        md.validate_layer(info, loaded["x.lin"], shape=(70, 51))


def test_header_and_tensor_disagree_or_weight_missing(tmp_path):
    t1, m1 = quantized_layer("a", "float8_e4m3fn")
    bad = {**t1, "a.comfy_quant": md.encode_comfy_quant(m1)}
    with pytest.raises(FormatError, match="a: header says format 'int8_tensorwise' but a.comfy_quant says 'float8_e4m3fn'"):
        md.discover_layers(bad, md.build_header({"a": {"format": "int8_tensorwise"}}), bad.__getitem__)
    with pytest.raises(FormatError, match=r"ghost: listed as quantized \(header\) but 'ghost.weight' is not in the file"):
        md.discover_layers(t1, md.build_header({"ghost": m1}), t1.__getitem__)


def test_missing_scale_and_shape_mismatch_are_errors_naming_the_layer():
    t1, m1 = quantized_layer("d.0", "int8_tensorwise", (8, 8), per_row=True)
    sd = {"d.0.weight": t1["d.0.weight"], "d.0.comfy_quant": md.encode_comfy_quant(m1)}
    info = md.discover_layers(sd, None, sd.__getitem__)["d.0"]
    with pytest.raises(FormatError, match=r"d\.0: missing tensor 'd\.0\.weight_scale'"):
        md.validate_layer(info, md.load_layer_tensors(info, sd.__getitem__))
    sd["d.0.weight_scale"] = torch.ones(4, 1)
    info = md.discover_layers(sd, None, sd.__getitem__)["d.0"]
    with pytest.raises(FormatError, match=r"d\.0\.weight_scale: expected shape \(8, 1\)"):
        md.validate_layer(info, md.load_layer_tensors(info, sd.__getitem__))
    # orig_shape in the metadata that contradicts the module's shape
    sd["d.0.comfy_quant"] = md.encode_comfy_quant({**m1, "orig_shape": [8, 8]})
    info = md.discover_layers(sd, None, sd.__getitem__)["d.0"]
    assert info.orig_shape == (8, 8)
    with pytest.raises(FormatError, match=r"d\.0: metadata orig_shape \(8, 8\) does not match the layer's shape \(8, 9\)"):
        md.validate_layer(info, {}, shape=(8, 9))


def test_packed_format_without_shape_is_an_error():
    info = md.LayerInfo("m", "mxfp8", {}, {"weight": "m.weight"}, {"format": "mxfp8"})
    with pytest.raises(FormatError, match="m: logical shape of this mxfp8 layer is unknown"):
        md.validate_layer(info, {"weight": torch.zeros(32, 32, dtype=torch.float8_e4m3fn)})


def test_state_dict_with_comfyui_header_string_key():
    t1, m1 = quantized_layer("a", "float8_e5m2")
    sd = {**t1, "_quantization_metadata": json.dumps({"layers": {"a": m1}})}
    layers = md.discover_layers(sd, {"_quantization_metadata": sd["_quantization_metadata"]}, sd.__getitem__)
    assert list(layers) == ["a"] and layers["a"].format == "float8_e5m2"


# ---- bitsandbytes --------------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
def test_discover_bitsandbytes_keys_as_bitsandbytes_writes_them(tmp_path, quant_type, nested):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(48, 40, dtype=torch.bfloat16)
    q, qs = bnbf.quantize_4bit(w, quant_type=quant_type, blocksize=64, compress_statistics=nested)
    tensors = {"net.fc.weight": q, "net.fc.bias": torch.zeros(48)}
    tensors.update({f"net.fc.weight.{k}": v for k, v in qs.as_dict(packed=True).items()})
    # a mixed file: one INT8 layer with .comfy_quant next to the BNB layer
    t2, m2 = quantized_layer("net.proj", "int8_tensorwise")
    tensors.update(t2)
    tensors["net.proj.comfy_quant"] = md.encode_comfy_quant(m2)
    layers, loaded, _ = write_and_discover(tmp_path, tensors, md.build_header({"net.proj": m2}))
    assert list(layers) == ["net.fc", "net.proj"]
    info = layers["net.fc"]
    assert info.format == f"bnb_{quant_type}" and info.source == "bnb"
    assert info.orig_shape == (48, 40)
    assert info.options == {"blocksize": 64, "double_quant": nested, "dtype": "bfloat16"}
    expect = {"weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{quant_type}"}
    if nested:
        expect |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(info.tensors) == expect
    assert info.comfy_quant() is None
    # the suffix map is complete: bitsandbytes rebuilds its QuantState from exactly these tensors
    fc = loaded["net.fc"]
    rebuilt = bnbf.QuantState.from_dict({k[len("weight."):]: v for k, v in fc.items() if k != "weight"}, device="cpu")
    assert torch.equal(bnbf.dequantize_4bit(fc["weight"], rebuilt), bnbf.dequantize_4bit(q, qs))
    md.validate_layer(info, fc)  # our bitsandbytes codec accepts what bitsandbytes wrote
    md.validate_layer(layers["net.proj"], loaded["net.proj"])
    with pytest.raises(FormatError, match=r"net\.fc"):
        md.validate_layer(info, {k: v for k, v in fc.items() if k != "weight.absmax"})


def test_bitsandbytes_bad_state_is_an_error():
    sd = {"l.weight": torch.zeros(4, 1, dtype=torch.uint8),
          "l.weight.quant_state.bitsandbytes__nf4": u8('{"quant_type": "fp4", "blocksize": 64, "dtype": "float16", "shape": [2, 4]}')}
    with pytest.raises(FormatError, match="l: quant state key says nf4 but its quant_type is 'fp4'"):
        md.discover_layers(sd, None, sd.__getitem__)
    sd["l.weight.quant_state.bitsandbytes__nf4"] = u8("{oops")
    with pytest.raises(FormatError, match="l: invalid bitsandbytes quant state"):
        md.discover_layers(sd, None, sd.__getitem__)
    sd["l.weight.quant_state.bitsandbytes__nf4"] = u8('{"quant_type": "nf4", "dtype": "float16", "shape": [2, 4]}')
    with pytest.raises(FormatError, match="l: bitsandbytes quant state lacks 'blocksize'"):
        md.discover_layers(sd, None, sd.__getitem__)


# ---- legacy scaled FP8 ---------------------------------------------------------------------------

def legacy_file(prefix="model.diffusion_model.", marker_dtype=torch.float8_e4m3fn, marker_numel=0, input_scale=True):
    """A scaled-FP8 checkpoint as older ComfyUI tooling wrote it (scale_weight/scale_input names)."""
    codec = get_codec("float8_e5m2" if marker_dtype == torch.float8_e5m2 else "float8_e4m3fn")
    sd = {f"{prefix}scaled_fp8": torch.zeros(marker_numel, dtype=marker_dtype)}
    ref = {}
    for i in range(2):
        w = torch.randn(24, 16)
        out = codec.quantize(w)
        layer = f"{prefix}blocks.{i}.lin"
        sd[f"{layer}.weight"] = out["weight"]
        sd[f"{layer}.scale_weight"] = out["weight_scale"].reshape(1) if i else out["weight_scale"]
        if input_scale:  # 1.0 is the "no static scale" placeholder older tools wrote
            sd[f"{layer}.scale_input"] = torch.tensor(1.0 if i else 0.75)
        sd[f"{layer}.bias"] = torch.zeros(24)
        ref[layer] = codec.dequantize(out, (24, 16))
    sd[f"{prefix}final.weight"] = torch.randn(4, 24, dtype=torch.bfloat16)
    return sd, ref


def test_discover_legacy_scaled_fp8(tmp_path):
    sd, ref = legacy_file()
    layers, loaded, _ = write_and_discover(tmp_path, sd)
    assert list(layers) == list(ref)
    for name, info in layers.items():
        assert (info.format, info.source) == ("float8_e4m3fn", "legacy_scaled_fp8")
        expect = {"weight": f"{name}.weight", "weight_scale": f"{name}.scale_weight"}
        if name.endswith("blocks.0.lin"):  # blocks.1's scale_input is the 1.0 placeholder: left out
            expect["input_scale"] = f"{name}.scale_input"
        assert info.tensors == expect
        assert info.dropped == (() if name.endswith("blocks.0.lin") else (f"{name}.scale_input",))
        assert info.comfy_quant() == {"format": "float8_e4m3fn"}
        md.validate_layer(info, loaded[name])
        assert torch.equal(get_codec(info.format).dequantize(loaded[name], (24, 16), **info.options), ref[name])


def test_legacy_marker_variants():
    sd, _ = legacy_file(prefix="", marker_dtype=torch.float8_e5m2, marker_numel=2, input_scale=False)
    layers = md.discover_layers(sd, None, sd.__getitem__)
    info = layers["blocks.0.lin"]
    assert info.format == "float8_e5m2" and info.options == {"full_precision_matrix_mult": True}
    assert "input_scale" not in info.tensors
    md.validate_layer(info, md.load_layer_tensors(info, sd.__getitem__))
    sd32, _ = legacy_file(marker_dtype=torch.float32)  # a float32 marker means e4m3fn
    assert {i.format for i in md.discover_layers(sd32, None, sd32.__getitem__).values()} == {"float8_e4m3fn"}


def test_legacy_wrong_dtype_or_missing_weight():
    sd, _ = legacy_file(marker_dtype=torch.float32)
    sd["model.diffusion_model.blocks.0.lin.weight"] = sd["model.diffusion_model.blocks.0.lin.weight"].view(torch.float8_e5m2)
    info = md.discover_layers(sd, None, sd.__getitem__)["model.diffusion_model.blocks.0.lin"]
    with pytest.raises(FormatError, match=r"model\.diffusion_model\.blocks\.0\.lin\.weight: expected dtype torch.float8_e4m3fn"):
        md.validate_layer(info, md.load_layer_tensors(info, sd.__getitem__))
    del sd["model.diffusion_model.blocks.1.lin.weight"]
    with pytest.raises(FormatError, match=r"model\.diffusion_model\.blocks\.1\.lin: has legacy .* but no"):
        md.discover_layers(sd, None, sd.__getitem__)


def test_comfy_quant_wins_over_legacy_names():
    t1, m1 = quantized_layer("a", "float8_e4m3fn")
    sd = {**t1, "a.comfy_quant": md.encode_comfy_quant(m1), "a.scale_weight": torch.tensor(1.0)}
    info = md.discover_layers(sd, None, sd.__getitem__)["a"]
    assert info.source == "comfy_quant" and info.tensors["weight_scale"] == "a.weight_scale"


# ---- every registered format through discovery + validate_layer ---------------------------------

@pytest.mark.parametrize("fmt", md.format_names())
def test_every_format_discovers_and_validates(fmt):
    codec = get_codec(fmt)
    shape = (50, 256) if "convrot" in codec.spec.aliases else (50, 70)  # ConvRot: in_features a multiple of its groups
    out = codec.quantize(torch.randn(shape))
    sd = {f"m.l.{k}": v for k, v in out.items()}
    meta = codec.metadata()
    if meta is not None:  # bitsandbytes layers carry their own quant state instead
        sd["m.l.comfy_quant"] = md.encode_comfy_quant({**meta, "orig_shape": list(shape)})
    info = md.discover_layers(sd, None, sd.__getitem__)["m.l"]
    assert info.format == fmt and info.orig_shape == shape
    assert set(info.tensors) == set(out)
    tensors = md.load_layer_tensors(info, sd.__getitem__)
    md.validate_layer(info, tensors)
    md.validate_layer(info, tensors, shape)
    with pytest.raises(FormatError, match="m.l"):
        md.validate_layer(info, {k: v for k, v in tensors.items() if k != "weight"})


# ---- stock ComfyUI reads the same thing ------------------------------------------------------------

@pytest.mark.comfyui
def test_stock_comfyui_agrees_on_header_and_legacy_names(comfy):
    """Our header parses in the real ComfyUI; on current ComfyUI (which has ``convert_old_quants``)
    its own legacy scaled-FP8 conversion gives the same formats and scale names as our discovery."""
    import comfy.model_detection
    import comfy.utils

    layers = {"double_blocks.0.img_attn.qkv": {"format": "float8_e4m3fn"},
              "double_blocks.0.txt_mlp.0": {"format": "int8_tensorwise", "per_row": True, "orig_dtype": "bfloat16"}}
    header = md.build_header(layers, {"modelspec.title": "t"})
    if not hasattr(comfy.utils, "convert_old_quants"):  # ComfyUI 0.3.75
        assert comfy.model_detection.detect_layer_quantization(dict(header)) == layers
        return
    for numel in (0, 2):
        sd, _ = legacy_file(marker_numel=numel)
        ours = md.discover_layers(sd, None, sd.__getitem__)
        out_sd, _ = comfy.utils.convert_old_quants(dict(sd), "model.diffusion_model.", {})
        theirs = {k[: -len(".comfy_quant")]: json.loads(bytes(v.tolist())) for k, v in out_sd.items()
                  if k.endswith(".comfy_quant")}
        assert theirs == {name: info.comfy_quant() for name, info in ours.items()}
        for name, info in ours.items():
            assert torch.equal(out_sd[f"{name}.weight_scale"], sd[info.tensors["weight_scale"]])
            assert (f"{name}.input_scale" in out_sd) == ("input_scale" in info.tensors)
    out_sd, _ = comfy.utils.convert_old_quants({}, "", dict(header))
    assert {k[: -len(".comfy_quant")]: json.loads(bytes(v.tolist())) for k, v in out_sd.items()} == md.parse_header(header)
