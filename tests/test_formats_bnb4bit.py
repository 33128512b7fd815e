"""bitsandbytes 4-bit codecs: byte-for-byte against bitsandbytes (CPU), both directions of loading."""

import json

import bitsandbytes.functional as F
import pytest
import torch
from codec_checks import assert_non_finite_refused

from hybridquant.converter.formats import get_codec
from hybridquant.converter.formats.base import FormatError
from hybridquant.converter.formats.bnb4bit import detect_bnb_format, dynamic_map

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_dynamo():
    # bitsandbytes' pure-torch dequantize (odd shapes) is wrapped in torch.compile; compiling it for
    # every shape costs seconds and changes nothing about the values.
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0])[:, None]).to(dtype)


def _bnb_dequant(q, st):
    """bitsandbytes' dequantize_4bit, except where its CPU AVX-512 kernel is known wrong.

    bitsandbytes 0.50.2's AVX-512 CPU kernel indexes absmax per row (``row * N/bs + col/bs``), which
    is wrong when rows are not a whole number of blocks (N % blocksize != 0); its own pure-torch
    reference and CUDA index the flattened tensor, as the format defines. Use that reference there.
    """
    n_last = st.shape[-1]
    if not (_HAS_AVX512 and n_last % st.blocksize and n_last % 2 == 0 and st.blocksize < 2048):
        return F.dequantize_4bit(q, st)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = st.absmax
    if st.nested:
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    code = _get_4bit_code(st.quant_type, q.device)
    return _dequantize_4bit_compute(q.reshape(-1), absmax.float(), code, st.blocksize, st.shape, st.dtype)


_HAS_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def _strip(t):
    return {k[len("weight."):]: v for k, v in t.items() if k != "weight"}


def _json(t):
    return json.loads(bytes(t.tolist()).decode())


def _check_vs_bnb(qt, w, bs, nested, pass_dtype=True):
    c = get_codec(f"bnb_{qt}")
    shape = tuple(w.shape)
    opts = dict(blocksize=bs, double_quant=nested, **({"dtype": w.dtype} if pass_dtype else {}))
    t = c.quantize(w, **opts)
    q, st = F.quantize_4bit(w, blocksize=bs, compress_statistics=nested, quant_type=qt)
    ref = st.as_dict(packed=True)
    assert torch.equal(t["weight"], q) and t["weight"].shape == q.shape
    assert set(t) == {"weight"} | {f"weight.{k}" for k in ref}
    for k, v in ref.items():
        ours = t[f"weight.{k}"]
        if k.startswith("quant_state."):
            assert _json(ours) == _json(v)
            raw, theirs = bytes(ours.tolist()), bytes(v.tolist())
            # identical bytes, except the trailing-space padding when the length had to be reserved
            assert raw.rstrip(b" ") == theirs
            if not nested and pass_dtype:
                assert raw == theirs
        else:
            assert ours.dtype == v.dtype and torch.equal(ours, v), k
    specs = c.output_specs(shape, **opts)
    assert {k: (s.dtype, s.shape) for k, s in specs.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}
    # bitsandbytes loads our tensors and decodes them to what our decoder gives
    st2 = F.QuantState.from_dict(_strip(t), CPU)
    theirs = _bnb_dequant(t["weight"], st2)
    assert theirs.dtype == w.dtype
    assert torch.equal(c.dequantize(t, shape, w.dtype), theirs)
    # and our decoder reads bitsandbytes' own serialization
    bnb_file = {"weight": q, **{f"weight.{k}": v for k, v in ref.items()}}
    c.validate("blk", bnb_file, shape)
    assert torch.equal(c.dequantize(bnb_file, shape, w.dtype), _bnb_dequant(q, st))
    return t


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("bs", [32, 64, 256, 4096])
def test_byte_for_byte_vs_bitsandbytes(qt, nested, bs):
    for shape, dtype in [((64, 96), torch.bfloat16), ((17, 33), torch.float32), ((1, 1), torch.float16), ((300, 129), torch.float16)]:
        _check_vs_bnb(qt, _weight(shape, dtype, seed=bs), bs, nested)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_many_absmax_blocks_nested(qt):
    # > 256 absmax values: several nested blocks, the nested tail block, and the LUT coding path
    _check_vs_bnb(qt, _weight((200, 160), torch.bfloat16, seed=7), 32, True)


def test_large_odd_shape():
    _check_vs_bnb("nf4", _weight((4095, 4097), torch.bfloat16, seed=5), 64, True)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_without_dtype_option_pads_json(qt):
    t = _check_vs_bnb(qt, _weight((16, 16), torch.float32), 64, False, pass_dtype=False)
    key = f"weight.quant_state.bitsandbytes__{qt}"
    assert bytes(t[key].tolist()).endswith(b" ")  # reserved for "bfloat16"


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_zeros_ties_and_outlier(qt):
    c = get_codec(f"bnb_{qt}")
    w = torch.zeros(8, 64)
    _check_vs_bnb(qt, w, 64, False)
    _check_vs_bnb(qt, w[:, :33].contiguous(), 64, False)  # zero tail block: bitsandbytes stores 1e-38
    _check_vs_bnb(qt, w, 64, True)
    # values exactly on code-book midpoints, signed zeros and tiny values
    table = F.get_4bit_type(qt, device="cpu")
    srt = table.sort().values
    mids = (srt[:-1] + srt[1:]) / 2
    vals = torch.cat([mids, -mids, torch.tensor([0.0, -0.0, 1e-6, -1e-6, 1.0, -1.0])])
    w = torch.cat([vals, torch.zeros(64 - vals.numel())]).reshape(1, 64).repeat(2, 1)
    _check_vs_bnb(qt, w, 32, False)
    w = _weight((4, 128))
    w[1, 5] = 1e4
    t = _check_vs_bnb(qt, w, 64, True)
    assert c.dequantize(t, (4, 128))[1, 5] == pytest.approx(1e4, rel=0.01)


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_rounding_contract(qt, nested):
    c = get_codec(f"bnb_{qt}")
    w = _weight((9, 70), torch.bfloat16, seed=2)
    w[0] = 0
    opts = dict(blocksize=32, double_quant=nested)
    p = c.scale_params(w, **opts)
    S = c.element_scale(p, (9, 70), **opts)
    t = c.quantize(w, params=p, **opts)
    fq = c.dequantize(t, (9, 70))
    # bitsandbytes scales by a reciprocal: that is the exact form of the identity for these codecs
    assert torch.equal(c.round_to_grid(w.float() * (1.0 / S)) * S, fq)
    assert torch.equal(p["absmax"].repeat_interleave(32)[: 9 * 70], S.reshape(-1))
    if nested:  # the stored statistics are the same; codes are chosen against the stored absmax
        plain = c.quantize(w, **opts)
        for k in plain:
            if k != "weight":
                assert torch.equal(plain[k], t[k]), k
        assert torch.equal(p["absmax"], c.effective_absmax(plain, {"nested": True, "nested_offset": p["nested_offset"].item(), "nested_blocksize": 256}))
    else:
        plain = c.quantize(w, **opts)
        assert all(torch.equal(plain[k], t[k]) for k in plain)
        assert torch.equal(c.block_amax(w, blocksize=32), p["absmax"])
    # on-grid weights are stored exactly
    again = c.quantize(fq, params=p, **opts)
    assert torch.equal(c.dequantize(again, (9, 70)), fq)
    # bitsandbytes reads files quantized with given params too
    st = F.QuantState.from_dict(_strip(t), CPU)
    assert torch.equal(_bnb_dequant(t["weight"], st), fq.to(torch.bfloat16))


def test_amax_override_and_errors():
    c = get_codec("bnb_nf4")
    w = _weight((4, 64))
    amax = c.block_amax(w) * 0.5
    p = c.scale_params(w, amax=amax)
    d = c.dequantize(c.quantize(w, params=p), (4, 64))
    assert float((d.abs() / c.element_scale(p, (4, 64))).max()) == 1.0
    with pytest.raises(FormatError, match="amax has shape"):
        c.scale_params(w, amax=amax[:1])
    with pytest.raises(FormatError, match="blocksize"):
        c.quantize(w, blocksize=48)
    with pytest.raises(FormatError, match="dtype"):
        c.quantize(w, dtype="int8")
    for bad in (float("nan"), float("inf")):
        w2 = w.clone()
        w2[0, 0] = bad
        assert_non_finite_refused(c, w2, w, "unet.fc1.weight")


def test_validate_errors_name_layer():
    c = get_codec("bnb_nf4")
    w = _weight((17, 33))
    t = c.quantize(w, double_quant=True, dtype=torch.float32)
    c.validate("L", t, (17, 33))
    qs = "weight.quant_state.bitsandbytes__nf4"
    cases = [
        ({k: v for k, v in t.items() if k != "weight.nested_quant_map"}, "L: missing tensor 'L.weight.nested_quant_map'"),
        ({k: v for k, v in t.items() if k != qs}, "exactly one"),
        ({**t, "weight": t["weight"][:-1]}, "packed 4-bit weight"),
        ({**t, "weight.absmax": t["weight.absmax"].float()}, "L.weight.absmax: expected dtype"),
        ({**t, qs: torch.tensor(list(b"{not json"), dtype=torch.uint8)}, "invalid quant state JSON"),
    ]
    for tensors, msg in cases:
        with pytest.raises(FormatError, match=msg):
            c.validate("L", tensors, (17, 33))
    with pytest.raises(FormatError, match="does not match the logical shape"):
        c.validate("L", t, (33, 17))
    with pytest.raises(FormatError, match="not fp4"):
        get_codec("bnb_fp4").validate("L", t, (17, 33))
    assert detect_bnb_format(t) == "bnb_nf4" and detect_bnb_format({"weight": w}) is None
    assert c.metadata() is None


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_stored_scale_params_requantize(qt, nested):
    c = get_codec(f"bnb_{qt}")
    w = _weight((12, 40), torch.bfloat16, seed=9)
    q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=qt)
    layer = {"weight": q, **{f"weight.{k}": v for k, v in st.as_dict(packed=True).items()}}
    opts = c.quant_state_options(layer)
    assert opts == {"blocksize": 64, "double_quant": nested, "dtype": "bfloat16"}
    p = c.stored_scale_params(layer, (12, 40))
    if nested:
        # rows spanning 4 decades: a small block's double-quantized absmax decodes NEGATIVE (in
        # bitsandbytes too); requantizing with the stored params must still reproduce the values
        assert bool((p["absmax"] < 0).any())
        st2 = F.QuantState.from_dict(_strip(layer), CPU)
        assert torch.equal(F.dequantize_blockwise(st2.absmax, st2.state2) + st2.offset, p["absmax"])
    fq = c.dequantize(layer, (12, 40))
    again = c.quantize(fq, params=p, **opts)
    for k in layer:
        if k.startswith("weight.quant_state."):  # same JSON (ours may carry reserved trailing spaces)
            assert _json(again[k]) == _json(layer[k])
        elif k != "weight":
            assert torch.equal(again[k], layer[k]), k  # statistics unchanged
    assert torch.equal(c.dequantize(again, (12, 40)), fq)
    if qt == "nf4":
        assert torch.equal(again["weight"], q)


def test_layers_share_no_storage(tmp_path):
    # safetensors refuses to save tensors that alias each other (e.g. one code-book tensor reused)
    from safetensors.torch import load_file, save_file

    c = get_codec("bnb_nf4")
    sd = {}
    for i, nested in enumerate((False, True, True)):
        for k, v in c.quantize(_weight((8, 64), seed=i), double_quant=nested).items():
            sd[f"l{i}.{k}"] = v
    save_file(sd, str(tmp_path / "m.safetensors"))
    back = load_file(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in sd.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_cuda_matches_cpu(qt, nested):
    # the nested statistics are computed on the CPU, so the bytes do not depend on the device
    c = get_codec(f"bnb_{qt}")
    w = _weight((300, 129), torch.bfloat16)
    a, b = c.quantize(w, double_quant=nested), c.quantize(w.cuda(), double_quant=nested)
    assert all(torch.equal(a[k], b[k].cpu()) for k in a)
    assert torch.equal(c.dequantize(b, (300, 129)).cpu(), c.dequantize(a, (300, 129)))
