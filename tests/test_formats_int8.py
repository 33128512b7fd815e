"""INT8 codecs (tensorwise, per-row, blockwise): symmetric ±127, scale = amax/127, round to nearest.

The expected codes come from numpy's ``rint`` (round half to even) on ``w / scale`` computed per
block with plain loops, independent of the codec's torch code; the analytic error bound is
``|w - dequant| <= scale / 2`` per block.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from codec_checks import assert_non_finite_refused

from hybridquant.converter.formats import FormatError, get_codec

VARIANTS = [  # (id, format name, options)
    ("tensorwise", "int8_tensorwise", {}),
    ("per_row", "int8_tensorwise", {"per_row": True}),
    ("blockwise8", "int8_blockwise", {"group_size": 8}),
    ("blockwise128", "int8_blockwise", {}),
]
IDS = [v[0] for v in VARIANTS]


def ref_scale(name, opts, w):
    a = w.double().abs().numpy()
    m, n = a.shape

    def s(x):
        return np.float32(1.0) if x == 0 else np.float32(np.float32(x) / np.float32(127))

    if name == "int8_tensorwise" and not opts.get("per_row"):
        return torch.tensor(s(a.max()))
    if name == "int8_tensorwise":
        return torch.tensor([[s(a[i].max())] for i in range(m)])
    bs = opts.get("group_size", 128)
    gm, gn = math.ceil(m / bs), math.ceil(n / bs)
    return torch.tensor([[s(a[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].max()) for j in range(gn)] for i in range(gm)])


def per_element(scale, shape, bs):
    m, n = shape
    if scale.ndim == 0:
        return scale.expand(m, n)
    if scale.shape == (m, 1):
        return scale.expand(m, n)
    return scale.repeat_interleave(bs, 0)[:m].repeat_interleave(bs, 1)[:, :n]


def within_half_step(deq, w, S):
    """|deq - w| <= S/2, allowing the float32 rounding of the product q*S (one ulp of |w|)."""
    w = w.float()
    return bool(((deq - w).abs() <= S / 2 + w.abs() * 2.0 ** -22).all())


def ref_codes(w, S):
    x = (w.float() / S).numpy()
    return torch.from_numpy(np.clip(np.rint(x), -127, 127).astype(np.int8))


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (9, 130), (64, 8)])
def test_codes_scales_and_half_step_error(variant, shape):
    _, name, opts = variant
    torch.manual_seed(hash(shape) % 997)
    w = torch.randn(shape) * torch.logspace(-2, 1, shape[0])[:, None]
    codec = get_codec(name)
    out = codec.quantize(w, **opts)
    scale = ref_scale(name, opts, w)
    assert torch.equal(out["weight_scale"], scale)
    S = per_element(scale, shape, opts.get("group_size", 128))
    assert torch.equal(out["weight"], ref_codes(w, S))
    assert out["weight"].dtype == torch.int8 and int(out["weight"].abs().max()) <= 127
    assert within_half_step(codec.dequantize(out, shape, **opts), w, S)


def test_round_to_nearest_not_truncation():
    w = torch.tensor([[127.0, 0.6, -0.6, 2.5, 3.5, -126.51]])
    out = get_codec("int8_tensorwise").quantize(w)
    assert out["weight_scale"] == 1.0
    assert out["weight"].tolist() == [[127, 1, -1, 2, 4, -127]]  # ties to even


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (200, 3), (128, 256)])
def test_output_specs_match_quantize_exactly(variant, shape):
    _, name, opts = variant
    codec = get_codec(name)
    out = codec.quantize(torch.randn(shape), **opts)
    specs = codec.output_specs(shape, **opts)
    assert {k: (t.dtype, tuple(t.shape)) for k, t in out.items()} == {k: (s.dtype, s.shape) for k, s in specs.items()}


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_round_to_grid_params_and_fake_quantize(variant):
    _, name, opts = variant
    torch.manual_seed(7)
    w = torch.randn(33, 70)
    codec = get_codec(name)
    params = codec.scale_params(w, **opts)
    S = codec.element_scale(params, (33, 70), **opts)
    out = codec.quantize(w, **opts)
    assert torch.equal(codec.round_to_grid(w / S, **opts) * S, codec.dequantize(out, (33, 70), **opts))
    again = codec.quantize(w, params=params, **opts)
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert torch.equal(codec.fake_quantize(w, **opts), codec.dequantize(out, (33, 70), **opts))
    assert torch.equal(codec.block_amax(w, **opts) / 127, params["weight_scale"])
    # clipping: amax override halves the range; out-of-range values saturate at ±127
    clipped = codec.quantize(w, params=codec.scale_params(w, amax=codec.block_amax(w, **opts) / 2, **opts), **opts)
    assert int(clipped["weight"].abs().max()) == 127
    # a weight already on the grid is stored bit-exactly with its params
    on_grid = codec.dequantize(out, (33, 70), **opts)
    assert torch.equal(codec.quantize(on_grid, params=params, **opts)["weight"], out["weight"])


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_dtypes(variant, dtype):
    _, name, opts = variant
    w = torch.randn(16, 40).to(dtype)
    codec = get_codec(name)
    a, b = codec.quantize(w, **opts), codec.quantize(w.float(), **opts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert codec.dequantize(a, (16, 40), dtype=dtype, **opts).dtype == dtype


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_all_zero_tensor_and_blocks(variant):
    _, name, opts = variant
    codec = get_codec(name)
    out = codec.quantize(torch.zeros(17, 33), **opts)
    assert (out["weight_scale"] == 1.0).all() and (out["weight"] == 0).all()
    assert torch.equal(codec.dequantize(out, (17, 33), **opts), torch.zeros(17, 33))
    w = torch.randn(17, 33)
    w[:, :8] = 0
    w[:8] = 0
    out = codec.quantize(w, **opts)
    assert torch.equal(out["weight_scale"], ref_scale(name, opts, w))
    assert (out["weight_scale"] > 0).all()
    assert torch.isfinite(codec.dequantize(out, (17, 33), **opts)).all()


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_single_huge_outlier(variant):
    _, name, opts = variant
    torch.manual_seed(8)
    w = torch.randn(24, 24) * 0.01
    w[3, 20] = -5e3
    codec = get_codec(name)
    out = codec.quantize(w, **opts)
    deq = codec.dequantize(out, (24, 24), **opts)
    assert deq[3, 20] == -5e3 and out["weight"][3, 20] == -127
    S = per_element(ref_scale(name, opts, w), (24, 24), opts.get("group_size", 128))
    assert within_half_step(deq, w, S)
    if name == "int8_blockwise" and opts.get("group_size") == 8:  # only the outlier's tile is coarse
        assert out["weight_scale"][0, 2] == np.float32(5e3) / np.float32(127)
        assert (out["weight_scale"][1:] < 1e-3).all()


def test_large_odd_shape_blockwise_and_per_row():
    torch.manual_seed(9)
    w = torch.randn(4095, 4097, dtype=torch.float16)
    wf = w.float()
    for name, opts, grid in (("int8_blockwise", {"group_size": 128}, (32, 33)), ("int8_tensorwise", {"per_row": True}, (4095, 1))):
        codec = get_codec(name)
        out = codec.quantize(w, **opts)
        assert codec.output_specs((4095, 4097), **opts)["weight_scale"].shape == grid
        assert tuple(out["weight_scale"].shape) == grid
        S = codec.element_scale(out, (4095, 4097), **opts)
        assert within_half_step(codec.dequantize(out, (4095, 4097), **opts), wf, S)
    assert out["weight_scale"][4094, 0] == wf[4094].abs().max() / 127


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_non_finite_input_names_the_tensor(variant):
    _, name, opts = variant
    for bad in (float("nan"), float("inf")):
        w = torch.randn(5, 5)
        w[0, 0] = bad
        assert_non_finite_refused(get_codec(name), w, torch.ones(5, 5), "single_blocks.7.linear1.weight", **opts)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_validate_names_layer_and_problem(variant):
    _, name, opts = variant
    codec = get_codec(name)
    good = codec.quantize(torch.randn(17, 33), **opts)
    codec.validate("txt_in", good, (17, 33), **opts)
    with pytest.raises(FormatError, match=r"txt_in: missing tensor 'txt_in\.weight_scale'"):
        codec.validate("txt_in", {"weight": good["weight"]}, (17, 33), **opts)
    with pytest.raises(FormatError, match=r"txt_in: missing tensor 'txt_in\.weight'"):
        codec.validate("txt_in", {"weight_scale": good["weight_scale"]}, (17, 33), **opts)
    with pytest.raises(FormatError, match=r"txt_in\.weight_scale: expected shape"):
        codec.validate("txt_in", dict(good, weight_scale=torch.ones(17)), (17, 33), **opts)
    with pytest.raises(FormatError, match=r"txt_in\.weight: expected shape"):
        codec.validate("txt_in", good, (33, 17), **opts)
    with pytest.raises(FormatError, match=r"txt_in\.weight: expected dtype torch.int8"):
        codec.validate("txt_in", dict(good, weight=good["weight"].to(torch.uint8)), (17, 33), **opts)


def test_per_row_inferred_from_scale_shape_when_absent():
    codec = get_codec("int8_tensorwise")
    w = torch.randn(6, 10)
    out = codec.quantize(w, per_row=True)
    codec.validate("L", out, (6, 10))  # {"format": "int8_tensorwise"} without per_row
    assert torch.equal(codec.dequantize(out, (6, 10)), codec.dequantize(out, (6, 10), per_row=True))
    with pytest.raises(FormatError, match=r"L\.weight_scale: expected shape \(\)"):
        codec.validate("L", out, (6, 10), per_row=False)
    with pytest.raises(FormatError, match="L: per_row must be true or false"):
        codec.validate("L", out, (6, 10), per_row="yes")


def test_metadata():
    assert get_codec("int8_tensorwise").metadata() == {"format": "int8_tensorwise"}
    assert get_codec("int8_tensorwise").metadata(per_row=True) == {"format": "int8_tensorwise", "per_row": True}
    assert get_codec("int8_blockwise").metadata() == {"format": "int8_blockwise", "group_size": 128}
    assert get_codec("int8_blockwise").metadata(group_size=32) == {"format": "int8_blockwise", "group_size": 32}
    # the whole .comfy_quant dict (with extras from other tools) can be splatted back in
    meta = {**get_codec("int8_blockwise").metadata(group_size=32), "orig_dtype": "bfloat16", "orig_shape": [64, 64]}
    out = get_codec("int8_blockwise").quantize(torch.randn(64, 64), **meta)
    get_codec("int8_blockwise").validate("L", out, (64, 64), **meta)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_cuda_matches_cpu(variant):
    _, name, opts = variant
    w = torch.randn(1030, 700, dtype=torch.bfloat16) * torch.logspace(-3, 2, 700).to(torch.bfloat16)
    codec = get_codec(name)
    a, b = codec.quantize(w, **opts), codec.quantize(w.cuda(), **opts)
    assert all(v.device.type == "cuda" for v in b.values())
    assert all(torch.equal(a[k], b[k].cpu()) for k in a)


def test_matches_comfy_kitchen_int8_tensorwise_and_rowwise():
    """comfy-kitchen (what current ComfyUI runs int8_tensorwise with) as an independent oracle.

    For float32 input its eager kernels compute ``round(x / (amax / 127))`` exactly like the spec, so
    codes and scales must agree bit for bit; its dequantize must reproduce ours.
    """
    ck = pytest.importorskip("comfy_kitchen")
    torch.manual_seed(11)
    w = torch.randn(67, 129) * torch.logspace(-2, 2, 129)
    codec = get_codec("int8_tensorwise")
    for opts, ref in (({}, ck.quantize_int8_tensorwise), ({"per_row": True}, ck.quantize_int8_rowwise)):
        q, s = ref(w)
        ours = codec.quantize(w, **opts)
        assert torch.equal(ours["weight_scale"], s) and torch.equal(ours["weight"], q)
        assert torch.equal(codec.dequantize(ours, (67, 129), **opts), ck.dequantize_int8_simple(q, s))
