"""FP8 codecs (tensorwise e4m3fn/e5m2, rowwise, blockwise) against an independent nearest-value oracle.

The oracle enumerates every finite value of the FP8 dtype from its 256 bit patterns and picks, for
each ``x = w / scale``, the nearest one (ties to the even code, i.e. even mantissa), saturating at
the largest magnitude. It shares no code with the codec (which uses torch's cast).
"""

from __future__ import annotations

import math

import pytest
import torch
from codec_checks import assert_non_finite_refused

from hybridquant.converter.formats import FormatError, NonFiniteError, get_codec
from hybridquant.converter.formats.fp8 import to_float8_saturated

E4 = torch.float8_e4m3fn
E5 = torch.float8_e5m2
FP8_NAMES = ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fn_rowwise", "float8_e4m3fn_blockwise"]
STORAGE = {"float8_e4m3fn": E4, "float8_e5m2": E5, "float8_e4m3fn_rowwise": E4, "float8_e4m3fn_blockwise": E4}
QMAX = {E4: 448.0, E5: 57344.0}


def value_table(dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    vals = codes.view(dtype).to(torch.float64)
    keep = torch.isfinite(vals)
    return vals[keep], codes[keep]


def oracle_nearest(x: torch.Tensor, dtype) -> torch.Tensor:
    """Nearest FP8 value of each element of float32 ``x`` (ties to even code), saturating; float64."""
    vals, codes = value_table(dtype)
    xf = x.to(torch.float64).reshape(-1, 1)
    xf = xf.clamp(-QMAX[dtype], QMAX[dtype])
    dist = (xf - vals.reshape(1, -1)).abs()
    best = dist.min(dim=1, keepdim=True).values
    # among the minimisers prefer the even code (even mantissa); +0 / -0 both fine for x == 0
    cand = (dist == best) & ((codes.reshape(1, -1) % 2) == 0)
    no_even = ~cand.any(dim=1, keepdim=True)
    cand = torch.where(no_even, dist == best, cand)
    idx = cand.to(torch.int8).argmax(dim=1)
    return vals[idx].reshape(x.shape)


def opts_for(name, bs=8):
    return {"group_size": bs} if name.endswith("blockwise") else {}


def ref_scale(name, w, bs=8):
    """Expected stored scale, computed independently with plain loops over blocks."""
    qmax = QMAX[STORAGE[name]]
    a = w.float().abs()
    m, n = a.shape

    def s(x):
        x = float(x)
        return 1.0 if x == 0 else x / qmax

    if name in ("float8_e4m3fn", "float8_e5m2"):
        return torch.tensor(s(torch.tensor(a.max().item()) if a.numel() else 0), dtype=torch.float32)
    if name == "float8_e4m3fn_rowwise":
        return torch.tensor([s(a[i].max()) for i in range(m)], dtype=torch.float32)
    gm, gn = math.ceil(m / bs), math.ceil(n / bs)
    return torch.tensor([[s(a[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].max()) for j in range(gn)] for i in range(gm)],
                        dtype=torch.float32)


def per_element(name, scale, shape, bs=8):
    m, n = shape
    if scale.ndim == 0:
        return scale.expand(m, n)
    if scale.ndim == 1:
        return scale[:, None].expand(m, n)
    return scale.repeat_interleave(bs, 0)[:m].repeat_interleave(bs, 1)[:, :n]


@pytest.mark.parametrize("name", FP8_NAMES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (8, 16), (40, 7)])
def test_codes_equal_nearest_value_of_w_over_scale(name, shape):
    torch.manual_seed(hash((name, shape)) % 1000)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # columns of very different magnitude
    codec = get_codec(name)
    out = codec.quantize(w, **opts_for(name))
    scale = ref_scale(name, w)
    # float32 amax/448 is the spec; compare scales with float32 arithmetic
    assert torch.equal(out["weight_scale"], scale.to(torch.float32))
    expect = oracle_nearest(w / per_element(name, scale, shape), STORAGE[name])
    assert torch.equal(out["weight"].to(torch.float64), expect)
    assert out["weight"].dtype == STORAGE[name]


@pytest.mark.parametrize("dtype", [E4, E5])
def test_ties_round_to_even_and_saturation(dtype):
    vals, _ = value_table(dtype)
    pos = torch.unique(vals[vals > 0])
    mids = (pos[:-1] + pos[1:]) / 2  # exact midpoints (representable in float32)
    x = torch.cat([mids, -mids, torch.tensor([1e6, -1e6, QMAX[dtype] * 1.03])]).to(torch.float32)
    got = to_float8_saturated(x, dtype).to(torch.float64)
    assert torch.equal(got, oracle_nearest(x, dtype))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("name", FP8_NAMES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (3, 200), (64, 64)])
def test_output_specs_match_quantize_exactly(name, shape):
    codec = get_codec(name)
    for extra in ({}, {"input_scale": 0.5}):
        opts = {**opts_for(name, 16), **extra}
        out = codec.quantize(torch.randn(shape), **opts)
        specs = codec.output_specs(shape, **opts)
        assert set(out) == set(specs)
        for k, t in out.items():
            assert (t.dtype, tuple(t.shape)) == (specs[k].dtype, specs[k].shape), k
        assert ("input_scale" in out) == ("input_scale" in extra)


@pytest.mark.parametrize("name", FP8_NAMES)
def test_round_to_grid_times_scale_equals_dequantize(name):
    torch.manual_seed(1)
    w = torch.randn(24, 40) * 3
    codec, o = get_codec(name), opts_for(name)
    params = codec.scale_params(w, **o)
    S = codec.element_scale(params, (24, 40), **o)
    lhs = codec.round_to_grid(w / S, **o) * S
    rhs = codec.dequantize(codec.quantize(w, **o), (24, 40), **o)
    assert torch.equal(lhs, rhs)
    assert torch.equal(codec.fake_quantize(w, **o), rhs)


@pytest.mark.parametrize("name", FP8_NAMES)
def test_params_round_trip_and_amax_override(name):
    torch.manual_seed(2)
    w = torch.randn(20, 30)
    codec, o = get_codec(name), opts_for(name)
    a, b = codec.quantize(w, **o), codec.quantize(w, params=codec.scale_params(w, **o), **o)
    assert all(torch.equal(a[k].view(torch.uint8) if a[k].dtype.itemsize == 1 else a[k], b[k].view(torch.uint8) if b[k].dtype.itemsize == 1 else b[k]) for k in a)
    amax = codec.block_amax(w, **o)
    assert torch.equal(codec.scale_params(w, amax=amax, **o)["weight_scale"], a["weight_scale"])
    # a clipped amax saturates values past the clip at the grid's end instead of producing NaN
    clipped = codec.quantize(w, params=codec.scale_params(w, amax=amax * 0.5, **o), **o)
    q = clipped["weight"].float()
    assert torch.isfinite(q).all() and q.abs().max() == QMAX[STORAGE[name]]
    with pytest.raises(FormatError):
        codec.scale_params(w, amax=amax.reshape(-1)[:1].reshape(1, 1, 1), **o)


@pytest.mark.parametrize("name", FP8_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_dtypes_compute_in_float32(name, dtype):
    torch.manual_seed(3)
    w = torch.randn(16, 24).to(dtype)
    codec, o = get_codec(name), opts_for(name)
    a, b = codec.quantize(w, **o), codec.quantize(w.float(), **o)
    assert torch.equal(a["weight"].view(torch.uint8), b["weight"].view(torch.uint8))
    assert torch.equal(a["weight_scale"], b["weight_scale"])
    assert codec.dequantize(a, (16, 24), dtype=dtype, **o).dtype == dtype


@pytest.mark.parametrize("name", FP8_NAMES)
def test_all_zero_tensor_and_all_zero_blocks(name):
    codec, o = get_codec(name), opts_for(name)
    z = torch.zeros(17, 33)
    out = codec.quantize(z, **o)
    assert (out["weight_scale"] == 1.0).all()
    d = codec.dequantize(out, (17, 33), **o)
    assert torch.equal(d, z)
    # zero rows / tiles next to non-zero ones: their scale is 1.0, the others amax/qmax
    w = torch.randn(17, 33)
    w[:8] = 0
    out = codec.quantize(w, **o)
    assert torch.isfinite(out["weight_scale"]).all() and (out["weight_scale"] > 0).all()
    assert torch.equal(out["weight_scale"], ref_scale(name, w))
    assert (codec.dequantize(out, (17, 33), **o)[:8] == 0).all()


@pytest.mark.parametrize("name", FP8_NAMES)
def test_single_huge_outlier(name):
    torch.manual_seed(4)
    w = torch.randn(32, 32) * 0.01
    w[5, 7] = 1e4
    codec, o = get_codec(name), opts_for(name)
    out = codec.quantize(w, **o)
    deq = codec.dequantize(out, (32, 32), **o)
    assert deq[5, 7] == 1e4  # the amax maps exactly onto the grid's end
    scale = ref_scale(name, w)
    assert torch.equal(out["weight_scale"], scale)
    S = per_element(name, scale, (32, 32))
    assert torch.equal(out["weight"].to(torch.float64), oracle_nearest(w / S, STORAGE[name]))
    if name.endswith("blockwise"):  # the outlier only coarsens its own tile
        assert (out["weight_scale"] == scale).all() and out["weight_scale"][0, 0] == 1e4 / 448
        assert out["weight_scale"][1, 1] < 1e-3


def test_large_odd_shape_blockwise():
    torch.manual_seed(5)
    w = torch.randn(4095, 4097, dtype=torch.bfloat16)
    codec = get_codec("float8_e4m3fn_blockwise")
    out = codec.quantize(w, group_size=128)
    specs = codec.output_specs((4095, 4097), group_size=128)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in out.items()} == {k: (s.dtype, s.shape) for k, s in specs.items()}
    assert specs["weight_scale"].shape == (32, 33)
    # last partial tile row/col: scale is the amax of exactly the real elements
    wf = w.float()
    assert out["weight_scale"][31, 32] == wf[3968:, 4096:].abs().max() / 448
    deq = codec.dequantize(out, (4095, 4097))
    S = codec.element_scale(out, (4095, 4097), group_size=128)
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 of each value above the normal range
    err = (deq - wf).abs()
    assert bool((err <= torch.maximum(wf.abs() * 2.0 ** -4, S * 2.0 ** -10)).all())


@pytest.mark.parametrize("name", FP8_NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_names_the_tensor(name, bad):
    w = torch.randn(4, 4)
    w[1, 2] = bad
    codec, o = get_codec(name), opts_for(name)
    assert_non_finite_refused(codec, w, torch.ones(4, 4), "blocks.3.attn.qkv.weight", **o)
    with pytest.raises(NonFiniteError, match="w2"):
        codec.scale_params(w, name="w2", **o)


@pytest.mark.parametrize("name", FP8_NAMES)
def test_validate_names_layer_and_problem(name):
    codec, o = get_codec(name), opts_for(name)
    good = codec.quantize(torch.randn(17, 33), **o)
    codec.validate("blk.0.ff", good, (17, 33), **o)
    with pytest.raises(FormatError, match=r"blk\.0\.ff.*missing tensor 'blk\.0\.ff\.weight_scale'"):
        codec.validate("blk.0.ff", {"weight": good["weight"]}, (17, 33), **o)
    bad_shape = dict(good, weight_scale=torch.ones(3, 3, 3))
    with pytest.raises(FormatError, match=r"blk\.0\.ff\.weight_scale: expected shape"):
        codec.validate("blk.0.ff", bad_shape, (17, 33), **o)
    with pytest.raises(FormatError, match=r"blk\.0\.ff\.weight: expected shape"):
        codec.validate("blk.0.ff", good, (17, 34), **o)
    with pytest.raises(FormatError, match=r"blk\.0\.ff\.weight: expected dtype"):
        codec.validate("blk.0.ff", dict(good, weight=good["weight"].float()), (17, 33), **o)
    with pytest.raises(FormatError, match=r"blk\.0\.ff\.weight_scale: expected dtype"):
        codec.validate("blk.0.ff", dict(good, weight_scale=good["weight_scale"].half()), (17, 33), **o)
    with pytest.raises(FormatError, match=r"blk\.0\.ff\.weight_scale: contains NaN"):
        codec.validate("blk.0.ff", dict(good, weight_scale=good["weight_scale"] * float("nan")), (17, 33), **o)
    with pytest.raises(FormatError, match=r"blk\.0\.ff\.input_scale"):
        codec.validate("blk.0.ff", dict(good, input_scale=torch.ones(2)), (17, 33), **o)


def test_blockwise_group_size_must_match_scale_grid():
    codec = get_codec("float8_e4m3fn_blockwise")
    out = codec.quantize(torch.randn(64, 64), group_size=32)
    codec.validate("L", out, (64, 64), group_size=32)
    with pytest.raises(FormatError, match=r"L\.weight_scale: expected shape \(1, 1\).*group_size 128"):
        codec.validate("L", out, (64, 64))
    with pytest.raises(FormatError, match="L: group_size must be a positive integer"):
        codec.validate("L", out, (64, 64), group_size=0)


def test_tensorwise_reads_legacy_one_element_scale():
    codec = get_codec("float8_e4m3fn")
    out = codec.quantize(torch.randn(8, 8))
    legacy = dict(out, weight_scale=out["weight_scale"].reshape(1))
    codec.validate("L", legacy, (8, 8))
    assert torch.equal(codec.dequantize(legacy, (8, 8)), codec.dequantize(out, (8, 8)))


def test_input_scale_written_and_checked():
    codec = get_codec("float8_e4m3fn")
    out = codec.quantize(torch.randn(8, 8), input_scale=torch.tensor(0.25))
    assert out["input_scale"].dtype == torch.float32 and out["input_scale"].shape == () and out["input_scale"] == 0.25
    codec.validate("L", out, (8, 8))
    for bad in (0.0, -1.0, float("nan"), torch.ones(2)):
        with pytest.raises(FormatError, match="input_scale"):
            codec.quantize(torch.randn(8, 8), input_scale=bad)


def test_metadata_and_non_2d():
    assert get_codec("float8_e4m3fn").metadata() == {"format": "float8_e4m3fn"}
    assert get_codec("float8_e5m2").metadata() == {"format": "float8_e5m2"}
    assert get_codec("float8_e4m3fn_rowwise").metadata() == {"format": "float8_e4m3fn_rowwise"}
    assert get_codec("float8_e4m3fn_blockwise").metadata() == {"format": "float8_e4m3fn_blockwise", "group_size": 128}
    assert get_codec("float8_e4m3fn_blockwise").metadata(group_size=64)["group_size"] == 64
    with pytest.raises(FormatError, match="only 2-D"):
        get_codec("float8_e4m3fn").quantize(torch.randn(4, 4, 4), name="conv.weight")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FP8_NAMES)
def test_cuda_matches_cpu(name):
    torch.manual_seed(6)
    w = torch.randn(1030, 700, dtype=torch.bfloat16) * torch.logspace(-3, 2, 700).to(torch.bfloat16)
    codec, o = get_codec(name), opts_for(name)
    a, b = codec.quantize(w, **o), codec.quantize(w.cuda(), **o)
    assert all(v.device.type == "cuda" for v in b.values())
    assert torch.equal(a["weight"].view(torch.uint8), b["weight"].cpu().view(torch.uint8))
    assert torch.equal(a["weight_scale"], b["weight_scale"].cpu())
    assert torch.equal(codec.dequantize(a, tuple(w.shape), **o), codec.dequantize(b, tuple(w.shape), **o).cpu())


def test_scale_and_dequantize_match_comfy_kitchen():
    """comfy-kitchen's TensorCoreFP8Layout (current ComfyUI's float8_e4m3fn reader) as an oracle:
    same amax/448 scale, and its dequantize of our data equals ours. (Its quantize multiplies by a
    reciprocal scale in the input dtype, so codes may differ at rare ties; they are not compared.)"""
    ck = pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.tensor.fp8 import TensorCoreFP8Layout

    torch.manual_seed(12)
    w = torch.randn(67, 129) * torch.logspace(-2, 2, 129)
    for name in ("float8_e4m3fn", "float8_e5m2"):
        codec = get_codec(name)
        ours = codec.quantize(w)
        _, params = TensorCoreFP8Layout.quantize(w, dtype=STORAGE[name])
        assert torch.equal(params.scale, ours["weight_scale"])
        theirs = ck.dequantize_per_tensor_fp8(ours["weight"], ours["weight_scale"], torch.float32)
        assert torch.equal(codec.dequantize(ours, (67, 129)), theirs)
