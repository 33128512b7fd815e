"""Our ops inside real ComfyUI (``comfy.ops``, ``comfy.model_patcher``): per-format outputs, mixed
files, model_size, device/dtype moves, low-VRAM casting, errors naming the layer.

Tolerances: on CPU the layers dequantize with the same float32 values the reference model holds and
run the same ``F.linear``, so outputs must agree to float32 rounding of the GEMM (rtol 1e-6). For
bitsandbytes layers the reference weight is bitsandbytes' OWN ``dequantize_4bit`` of the tensors
bitsandbytes wrote (an independent oracle), same bound.
"""

from __future__ import annotations

import ops_helpers as H
import pytest
import torch

pytestmark = pytest.mark.comfyui

ALL_CASES = list(H.CODEC_CASES) + list(H.BNB_CASES)


def _skip_missing(case):
    fmt = case.split("+")[0]
    if not H.codec_available(fmt):
        pytest.skip(f"codec {fmt} not in this checkout yet")


@pytest.mark.parametrize("case", ALL_CASES)
def test_every_format_matches_dequantized_reference(ops, case):
    _skip_missing(case)
    sd, ref = H.build({"a": case, "b": case, "c": case})
    ours, refm = H.load_ours(sd), H.reference_model(ref)
    x = H.inputs()
    torch.testing.assert_close(ours(x), refm(x), rtol=1e-6, atol=1e-6)
    # unprepared state dict (raw file keys) loads the same
    torch.testing.assert_close(H.load_ours(sd, prepare=False)(x), refm(x), rtol=1e-6, atol=1e-6)
    # state_dict() writes the file's own keys and tensors back
    out_sd = ours.state_dict()
    assert set(out_sd) == set(sd)
    for k, v in sd.items():
        assert out_sd[k].dtype == v.dtype and torch.equal(out_sd[k].view(-1).view(torch.uint8), v.reshape(-1).contiguous().view(torch.uint8)), k


def test_mixed_bnb_fp8_int8_file(ops):
    sd, ref = H.build({"a": "bnb_nf4+nested", "b": "float8_e4m3fn", "c": "int8_tensorwise+per_row"})
    assert ops.choose_ops(sd.keys(), {}) is ops.HybridBNB4bitOps
    ours, refm = H.load_ours(sd), H.reference_model(ref)
    x = H.inputs()
    torch.testing.assert_close(ours(x), refm(x), rtol=1e-6, atol=1e-6)
    assert ours.a.hq_format == "bnb_nf4" and ours.b.hq_format == "float8_e4m3fn" and ours.c.hq_format == "int8_tensorwise"


def test_plain_layers_are_stock(ops, comfy):
    sd, ref = H.build({"b": "float8_e4m3fn"})
    ours = H.load_ours(sd)
    assert ours.a.hq_format is None and ours.c.hq_format is None
    assert not hasattr(ours.a, "set_weight") and not hasattr(ours.a, "convert_weight")
    stock = H.reference_model(ref)
    x = H.inputs()
    torch.testing.assert_close(ours.a(x), stock.a(x), rtol=0, atol=0)


def test_legacy_scaled_fp8_and_header_only(ops):
    fw = H.float_weights()
    codec = ops_codec("float8_e4m3fn")
    legacy, header_only, ref = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}, {}
    layers = {}
    for name, _i, _o, bias in H.DIMS:
        q = codec.quantize(fw[f"{name}.weight"])
        legacy[f"{name}.weight"], legacy[f"{name}.scale_weight"] = q["weight"], q["weight_scale"]
        header_only[f"{name}.weight"], header_only[f"{name}.weight_scale"] = q["weight"], q["weight_scale"]
        layers[name] = {"format": "float8_e4m3fn"}
        ref[f"{name}.weight"] = codec.dequantize(q, tuple(q["weight"].shape))
        if bias:
            for d in (legacy, header_only, ref):
                d[f"{name}.bias"] = fw[f"{name}.bias"]
    from hybridquant.converter import metadata as qmeta

    header = qmeta.build_header(layers)
    x = H.inputs()
    refm = H.reference_model(ref)
    prepared = ops.prepare_state_dict(legacy, None)
    assert "scaled_fp8" not in prepared and "a.comfy_quant" in prepared and "a.weight_scale" in prepared
    torch.testing.assert_close(H.load_ours(legacy)(x), refm(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(H.load_ours(header_only, header=header)(x), refm(x), rtol=1e-6, atol=1e-6)


def ops_codec(name):
    from hybridquant.converter.formats import get_codec

    return get_codec(name)


def test_prepare_state_dict_shows_logical_shapes(ops):
    sd, _ = H.build({"a": "bnb_nf4", "b": "mxfp8", "c": "float8_e4m3fn"})
    before = {k: v for k, v in sd.items()}
    p = ops.prepare_state_dict(sd, {})
    assert tuple(p["a.weight"].shape) == (96, 80) and tuple(p["b.weight"].shape) == (40, 96)
    assert tuple(p["c.weight"].shape) == (48, 40) and p["c.weight"].dtype == torch.float32
    assert p["a.weight_qdata"] is sd["a.weight"] and p["a.weight"].untyped_storage().nbytes() <= 4
    assert sd.keys() == before.keys() and all(sd[k] is before[k] for k in sd)  # input untouched


def test_model_size_is_stored_bytes(ops, comfy):
    import comfy.model_patcher

    sd, _ = H.build({"a": "bnb_nf4+nested", "b": "float8_e4m3fn_blockwise", "c": "int8_tensorwise"})
    m = H.load_ours(sd)
    mp = comfy.model_patcher.ModelPatcher(m, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    assert mp.model_size() == H.stored_bytes(sd)
    float_bytes = sum(o * i * 4 for _n, i, o, _b in H.DIMS)
    assert mp.model_size() < float_bytes / 2.5


def test_dtype_and_meta_moves_keep_quantized_data(ops):
    sd, _ = H.build({"a": "float8_e4m3fn", "b": "bnb_fp4", "c": "mxfp8"})
    m = H.load_ours(sd)
    x = H.inputs()
    y0 = m(x)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.to(torch.float16)  # quantized tensors must not be cast (FP8 counts as floating point in torch)
    m.to(torch.float32)
    after = m.state_dict()
    for k in ("a.weight", "a.weight_scale", "b.weight", "b.weight.absmax", "c.weight", "c.weight_scale"):
        assert after[k].dtype == before[k].dtype and torch.equal(after[k].reshape(-1).view(torch.uint8), before[k].reshape(-1).view(torch.uint8)), k
    m2 = H.load_ours(sd)
    m2.to("meta")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in m2.state_dict().items() if not k.endswith("comfy_quant")} == \
           {k: (v.dtype, tuple(v.shape)) for k, v in before.items() if not k.endswith("comfy_quant")}
    assert m2.a.weight.device.type == "meta" and m2.a.hq_weight_scale.device.type == "meta"
    # biases went through fp16 and back: compare with a model whose biases took the same trip
    m3 = H.load_ours(sd)
    for layer in (m3.a, m3.c):
        layer.bias.data = layer.bias.data.half().float()
    torch.testing.assert_close(m(x), m3(x), rtol=0, atol=0)
    assert y0.shape == m(x).shape


def test_lowvram_cast_path_identical(ops, comfy):
    import comfy.model_patcher

    sd, _ = H.build({"a": "bnb_nf4", "b": "float8_e4m3fn", "c": "int8_blockwise"})
    x = H.inputs()
    full = H.load_ours(sd)
    y_full = full(x)
    m = H.load_ours(sd)
    mp = comfy.model_patcher.ModelPatcher(m, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    mp.load(torch.device("cpu"), lowvram_model_memory=1)  # nothing fits: every layer casts per call
    assert all(getattr(l, "comfy_cast_weights", False) for l in (m.a, m.b, m.c))
    torch.testing.assert_close(m(x), y_full, rtol=0, atol=0)
    mp.unpatch_model(torch.device("cpu"))
    torch.testing.assert_close(m(x), y_full, rtol=0, atol=0)


@pytest.mark.parametrize("case", [None, "float8_e4m3fn", "int8_tensorwise", "nvfp4", "bnb_nf4"])
def test_core_linear_input_act_calls_quantized_layers(ops, comfy, case, monkeypatch):
    """``comfy.ops.linear_input_act`` (0.33+: model code's fused ``linear(act(x))``) gives the layer's own
    output. 0.38 added a branch for fp16-accumulating CUDA runs that casts a weight which is no core
    QuantizedTensor itself and feeds it to comfy-kitchen's fp16 GEMM. Where the core has that branch it
    is forced on here (its CUDA/fp16 check and the kitchen GEMM replaced by ``F.linear``): quantized
    layers must still be called (their weight is stored codes), plain layers keep the core's fusion."""
    import comfy.ops

    fn = getattr(comfy.ops, "linear_input_act", None)
    if fn is None:
        pytest.skip("this ComfyUI core has no comfy.ops.linear_input_act (0.3.75)")
    if case is not None:
        _skip_missing(case)
    sd, _ = H.build({"a": case})
    ours = H.load_ours(sd)
    assert (ours.a.hq_format is None) == (case is None)
    x = H.inputs()
    want = ours.a(torch.nn.functional.gelu(x, approximate="tanh"))
    torch.testing.assert_close(fn(ours.a, x, "gelu_tanh"), want, rtol=0, atol=0)
    if not hasattr(comfy.ops, "_fp16_linear_wanted"):
        return  # 0.33: no fp16-accumulation branch
    fused = []

    def fp16_linear(x_act, weight, bias, residual=None, residual_scale=None):
        fused.append(weight)
        out = torch.nn.functional.linear(x_act, weight, bias)
        return out if residual is None else torch.addcmul(residual, out, residual_scale)

    monkeypatch.setattr(comfy.ops, "_fp16_linear_wanted", lambda t: True)
    monkeypatch.setattr(comfy.ops.quant_ops.ck, "fp16_linear", fp16_linear, raising=False)
    torch.testing.assert_close(fn(ours.a, x, "gelu_tanh"), want, rtol=1e-6, atol=1e-6)
    assert bool(fused) == (case is None)


@pytest.mark.parametrize("problem", ["missing_scale", "scale_shape", "unknown_format", "packed_size", "orig_shape"])
def test_inconsistent_files_name_the_layer(ops, problem):
    from hybridquant.converter import metadata as qmeta
    from hybridquant.converter.formats import FormatError

    case = "bnb_nf4" if problem == "packed_size" else "float8_e4m3fn_rowwise"
    sd, _ = H.build({"b": case})
    if problem == "missing_scale":
        del sd["b.weight_scale"]
    elif problem == "scale_shape":
        sd["b.weight_scale"] = sd["b.weight_scale"][:-1]
    elif problem == "unknown_format":
        sd["b.comfy_quant"] = torch.tensor(list(b'{"format":"float7_magic"}'), dtype=torch.uint8)
    elif problem == "packed_size":
        sd["b.weight"] = sd["b.weight"][:-3]
    elif problem == "orig_shape":
        sd["b.comfy_quant"] = qmeta.encode_comfy_quant({"format": "float8_e4m3fn_rowwise", "orig_shape": [41, 96]})
    with pytest.raises(FormatError, match=r"\bb\b"):
        H.load_ours(sd, prepare=False)
