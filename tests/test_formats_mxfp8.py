"""MXFP8 codec: bit-exact against comfy-kitchen (CPU), edge cases, rounding contract, validation."""

import comfy_kitchen as ck
import pytest
import torch
from codec_checks import assert_non_finite_refused, assert_rounding_contract

from hybridquant.converter.formats import get_codec
from hybridquant.converter.formats.base import FormatError

C = get_codec("mxfp8")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.logspace(-4, 2, shape[0])[:, None]  # rows spanning 6 decades
    return (torch.randn(shape, generator=g) * rows).to(dtype)


def _assert_matches_kitchen(w):
    shape = tuple(w.shape)
    t = C.quantize(w)
    q, s = ck.quantize_mxfp8(w, pad_32x=True)
    assert torch.equal(t["weight"].view(torch.uint8), q.view(torch.uint8))
    assert t["weight_scale"].dtype == torch.uint8
    assert torch.equal(t["weight_scale"], s.view(torch.uint8))
    ours = C.dequantize(t, shape)
    theirs = ck.dequantize_mxfp8(q, s, torch.float32)[: shape[0], : shape[1]]
    assert torch.equal(ours, theirs)
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (32, 64), (130, 300), (64, 4096)])
def test_bit_exact_vs_comfy_kitchen(shape, dtype):
    w = _weight(shape, dtype)
    t = _assert_matches_kitchen(w)
    specs = C.output_specs(shape)
    assert {k: (v.dtype, v.shape) for k, v in specs.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}


def test_large_odd_shape_vs_comfy_kitchen():
    _assert_matches_kitchen(_weight((4095, 4097), torch.bfloat16, seed=3))


def test_exact_power_of_two_boundaries():
    # amax exactly 448*2^k needs scale 2^k; the next float above needs 2^(k+1). A float log2 can
    # get the second case wrong; we use the exponent bits.
    w = torch.zeros(4, 32)
    w[0, 0] = 448.0
    w[1, 0] = 448.0 * 2.0**-20
    w[2, 0] = torch.nextafter(torch.tensor(448.0), torch.tensor(1e9))
    w[3, 0] = 3.0e-39  # denormal amax: smallest nonzero code, not code 0
    codes = C.scale_params(w)["weight_scale"][:, 0].tolist()
    assert codes == [127, 107, 128, 1]
    deq = C.fake_quantize(w)
    assert deq[0, 0] == 448.0 and deq[1, 0] == w[1, 0] and deq[2, 0] == 448.0
    assert deq[3, 0] > 0


def test_zero_tensor_zero_blocks_and_outlier():
    z = torch.zeros(17, 33)
    t = _assert_matches_kitchen(z)
    assert int(t["weight_scale"].max()) == 0
    assert torch.equal(C.dequantize(t, (17, 33)), z)
    w = _weight((40, 96))
    w[:, 32:64] = 0  # whole all-zero blocks
    w[5, 70] = 3.0e4  # a single huge outlier only affects its own block
    t = _assert_matches_kitchen(w)
    d = C.dequantize(t, (40, 96))
    assert torch.equal(d[:, 32:64], torch.zeros(40, 32))
    assert d[5, 70] == w[5, 70] or abs(d[5, 70] / w[5, 70] - 1) < 2**-4
    other = torch.cat([w[:, :32], w[:, 64:]], 1)
    rel = ((torch.cat([d[:, :32], d[:, 64:]], 1) - other).abs() / other.abs().clamp_min(1e-30))
    assert float(rel[other.abs() > other.abs().amax(1, keepdim=True) * 2**-6].max()) <= 2**-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises_naming_tensor(bad):
    w = _weight((8, 40))
    w[3, 7] = bad
    assert_non_finite_refused(C, w, _weight((8, 40)), "blocks.3.attn.weight")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_contract(dtype):
    w = _weight((19, 70), dtype, seed=1)
    w[2, :32] = 0
    p, _, _ = assert_rounding_contract(C, w)
    assert p["weight_scale"].shape == (19, 3)
    expected_amax = torch.nn.functional.pad(w.float().abs(), (0, 26)).reshape(19, 3, 32).amax(2)
    assert torch.equal(C.block_amax(w), expected_amax)


def test_amax_override_clips():
    w = _weight((4, 64))
    amax = C.block_amax(w) * 0.5
    p = C.scale_params(w, amax=amax)
    d = C.dequantize(C.quantize(w, params=p), (4, 64))
    S = C.element_scale(p, (4, 64))
    assert float((d.abs() / S).max()) == 448.0  # saturated, not wrapped or NaN
    with pytest.raises(FormatError, match="block grid"):
        C.scale_params(w, amax=amax[:, :1])


def test_validate_errors_name_layer():
    t = C.quantize(_weight((17, 33)))
    C.validate("L", t, (17, 33))
    with pytest.raises(FormatError, match="L: missing tensor 'L.weight_scale'"):
        C.validate("L", {"weight": t["weight"]}, (17, 33))
    with pytest.raises(FormatError, match="L.weight: expected shape"):
        C.validate("L", t, (17, 65))
    with pytest.raises(FormatError, match="L.weight_scale: expected dtype"):
        C.validate("L", {**t, "weight_scale": t["weight_scale"].float()}, (17, 33))
    with pytest.raises(FormatError, match="L.weight_scale: expected shape"):
        C.validate("L", {**t, "weight_scale": t["weight_scale"][:64]}, (17, 33))
    with pytest.raises(FormatError, match="L.weight: expected dtype"):
        C.validate("L", {**t, "weight": t["weight"].view(torch.uint8)}, (17, 33))
    with pytest.raises(FormatError, match="group_size"):
        C.quantize(_weight((4, 32)), group_size=16)


def test_reads_e8m0_typed_scales_and_metadata():
    w = _weight((33, 64))
    q, s = ck.quantize_mxfp8(w, pad_32x=True)  # comfy-kitchen's in-memory dtype: float8_e8m0fnu
    assert torch.equal(C.dequantize({"weight": q, "weight_scale": s}, (33, 64)), C.fake_quantize(w))
    assert C.metadata() == {"format": "mxfp8"}


def test_stored_scale_params_requantize():
    w = _weight((17, 33))
    q, s = ck.quantize_mxfp8(w, pad_32x=True)
    layer = {"weight": q, "weight_scale": s}
    p = C.stored_scale_params(layer, (17, 33))
    again = C.quantize(C.dequantize(layer, (17, 33)), params=p)
    assert torch.equal(again["weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(again["weight_scale"], s.view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
@pytest.mark.parametrize("name", ["mxfp8", "hybrid_mxfp8"])
def test_cuda_matches_cpu(name):
    c = get_codec(name)
    w = _weight((300, 129), torch.bfloat16)
    a, b = c.quantize(w), c.quantize(w.cuda())
    assert all(torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].cpu().reshape(-1).view(torch.uint8)) for k in a)
    assert torch.equal(c.dequantize(b, (300, 129)).cpu(), c.dequantize(a, (300, 129)))
