"""Hybrid MXFP8: MXFP8 bytes + tensorwise scalar, and the exact tensorwise re-expression."""

import comfy_kitchen as ck
import pytest
import torch
from codec_checks import assert_rounding_contract

from hybridquant.converter.formats import get_codec
from hybridquant.converter.formats.base import FormatError
from hybridquant.converter.formats.hybrid_mxfp8 import mxfp8_to_hybrid, to_tensorwise_fp8

H = get_codec("hybrid_mxfp8")
MX = get_codec("mxfp8")


def _spanning_weight(m=256, n=512, span_log2=10, seed=0):
    """Gaussian rows whose magnitudes span 2^span_log2 (like real layers with hot rows)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) * (2.0 ** torch.linspace(-span_log2, 0, m))[:, None]


def _rel(a, w):
    return float((a - w).norm() / w.norm())


def test_keys_are_mxfp8_plus_scalar():
    w = _spanning_weight(40, 70)
    t, plain = H.quantize(w), MX.quantize(w)
    for k in plain:
        assert torch.equal(t[k].view(torch.uint8), plain[k].view(torch.uint8))
    # default scalar: the largest decoded block scale (a power of two)
    codes = MX.logical_codes(plain, (40, 70))
    assert float(t["weight_scalar"]) == 2.0 ** (int(codes.max()) - 127)
    assert t["weight_scalar"].shape == () and t["weight_scalar"].dtype == torch.float32
    specs = H.output_specs((40, 70))
    assert {k: (v.dtype, v.shape) for k, v in specs.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}
    assert torch.equal(H.dequantize(t, (40, 70)), MX.fake_quantize(w))
    assert H.metadata() == {"format": "hybrid_mxfp8"}
    H.validate("L", t, (40, 70))
    # the rounding contract is MXFP8's
    assert_rounding_contract(H, w)


def test_tensorwise_reexpression_error_and_naive_scalar_error():
    w = _spanning_weight()
    shape = tuple(w.shape)
    t = H.quantize(w)
    err_mx = _rel(MX.fake_quantize(w), w)
    wt, s = to_tensorwise_fp8(t, shape)
    assert wt.dtype == torch.float8_e4m3fn and tuple(wt.shape) == shape and wt.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == ()
    err_t = _rel(wt.float() * s, w)
    assert err_t <= 1.05 * err_mx
    # The power-of-two scalar makes it an exact shift wherever the shifted value stays e4m3-normal.
    deq = H.dequantize(t, shape)
    normal = deq.abs() >= 2.0**-6 * s
    assert torch.equal((wt.float() * s)[normal], deq[normal])
    assert float((wt.float() * s - deq).abs().max()) <= 2.0**-10 * float(s)
    # ARCHITECTURE.md (hybrid_mxfp8 docstring): multiplying the raw codes by the scalar is badly wrong.
    err_naive = _rel(t["weight"][: shape[0], : shape[1]].float() * s, w)
    assert err_naive > 0.9 and err_naive > 20 * err_mx
    # and a matmul through the tensorwise weight matches the MXFP8 one
    x = torch.randn(8, shape[1], generator=torch.Generator().manual_seed(1))
    y_t, y_mx = x @ (wt.float() * s).T, x @ deq.T
    assert float((y_t - y_mx).norm() / y_mx.norm()) < 1e-3


def test_imported_scalar_power_of_two_and_not():
    w = _spanning_weight(128, 256, seed=2)
    shape = tuple(w.shape)
    err_mx = _rel(MX.fake_quantize(w), w)
    plain = MX.quantize(w)
    # an imported scale twice the largest block scale: still a pure shift
    top = float(H.quantize(w)["weight_scalar"])
    h2 = mxfp8_to_hybrid(plain, shape, scalar=2 * top)
    assert float(h2["weight_scalar"]) == 2 * top
    wt, s = to_tensorwise_fp8(h2, shape)
    assert _rel(wt.float() * s, w) <= 1.05 * err_mx
    # a tensorwise FP8 scale amax/448 (not a power of two): rounded again, bounded extra error
    h3 = H.quantize(w, scalar=w.abs().amax() / 448)
    assert torch.equal(h3["weight"].view(torch.uint8), plain["weight"].view(torch.uint8))
    wt, s = to_tensorwise_fp8(h3, shape)
    assert float(s) == float(w.abs().amax() / 448)
    assert _rel(wt.float() * s, w) <= 2.0 * err_mx
    with pytest.raises(FormatError, match="finite and > 0"):
        mxfp8_to_hybrid(plain, shape, scalar=0.0)


def test_convert_existing_mxfp8_file_layer():
    # an MXFP8 layer as comfy-kitchen / stock ComfyUI produce it (scale typed float8_e8m0fnu)
    w = _spanning_weight(33, 65, seed=3)
    q, sc = ck.quantize_mxfp8(w, pad_32x=True)
    h = mxfp8_to_hybrid({"weight": q, "weight_scale": sc}, (33, 65), layer="blocks.0.mlp")
    assert h["weight_scale"].dtype == torch.uint8
    H.validate("blocks.0.mlp", h, (33, 65))
    assert torch.equal(H.dequantize(h, (33, 65)), ck.dequantize_mxfp8(q, sc, torch.float32)[:33, :65])
    wt, s = to_tensorwise_fp8({"weight": q, "weight_scale": sc}, (33, 65))  # plain MXFP8 works too
    assert float(s) == float(h["weight_scalar"])
    with pytest.raises(FormatError, match="blocks.0.mlp: missing tensor 'blocks.0.mlp.weight_scale'"):
        mxfp8_to_hybrid({"weight": q}, (33, 65), layer="blocks.0.mlp")


def test_all_zero_and_validate():
    z = torch.zeros(5, 7)
    t = H.quantize(z)
    assert float(t["weight_scalar"]) == 1.0
    wt, s = to_tensorwise_fp8(t, (5, 7))
    assert torch.equal(wt.float(), z) and float(s) == 1.0
    with pytest.raises(FormatError, match="L: missing tensor 'L.weight_scalar'"):
        H.validate("L", {k: v for k, v in t.items() if k != "weight_scalar"}, (5, 7))
    with pytest.raises(FormatError, match="L.weight_scalar: must be finite"):
        H.validate("L", {**t, "weight_scalar": torch.tensor(float("nan"))}, (5, 7))
    with pytest.raises(FormatError, match="L.weight_scalar: expected dtype"):
        H.validate("L", {**t, "weight_scalar": torch.tensor(1.0, dtype=torch.float16)}, (5, 7))


def test_stored_scale_params_keep_scalar():
    w = _spanning_weight(20, 40)
    t = H.quantize(w, scalar=0.37)
    p = H.stored_scale_params(t, (20, 40))
    again = H.quantize(H.dequantize(t, (20, 40)), params=p)
    assert float(again["weight_scalar"]) == pytest.approx(0.37)
    assert all(torch.equal(again[k].view(torch.uint8), t[k].view(torch.uint8)) for k in ("weight", "weight_scale"))
