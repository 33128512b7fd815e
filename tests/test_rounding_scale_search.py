"""Data-free default (clipping search) and the block geometry it relies on."""

from __future__ import annotations

import pytest
import torch

from hybridquant.converter.formats import get_codec
from hybridquant.converter.rounding import METHODS, quantize_weight
from hybridquant.converter.rounding.blocks import BlockMap
from hybridquant.converter.rounding.scale_search import fake_quant, search_scales

FORMATS = [
    ("float8_e4m3fn", {}),
    ("float8_e4m3fn_rowwise", {}),
    ("float8_e4m3fn_blockwise", {"group_size": 32}),
    ("int8_tensorwise", {}),
    ("int8_tensorwise", {"per_row": True}),
    ("int8_blockwise", {"group_size": 16}),
    ("mxfp8", {}),
    ("hybrid_mxfp8", {}),
    ("nvfp4", {}),
    ("bnb_nf4", {"blocksize": 64}),
    ("bnb_fp4", {"blocksize": 128}),
]


def heavy_tailed(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Student-t-like weights: most values small, a few large ones (what clipping is for).
    w = torch.randn(m, n, generator=g) / torch.rand(m, n, generator=g).clamp_min(0.05).sqrt()
    return w * 0.01


@pytest.mark.parametrize("name,opts", FORMATS)
@pytest.mark.parametrize("shape", [(40, 72), (33, 50)])
def test_block_geometry_matches_codec(name, opts, shape):
    codec = get_codec(name)
    w = heavy_tailed(*shape)
    bmap = BlockMap.probe(codec, shape, **opts)
    amax = codec.block_amax(w, **opts)
    assert tuple(bmap.reduce_sum(w).shape) == tuple(amax.shape)
    full = bmap.expand(amax)
    assert tuple(full.shape) == shape
    assert bool((full >= w.abs()).all())  # every element lies in a block whose amax covers it
    hits = bmap.reduce_sum((w.abs() == full).float())
    assert bool((hits >= 1).all())  # and each block's amax is attained inside that block
    counts = bmap.reduce_sum(torch.ones(shape))
    assert int(counts.sum()) == shape[0] * shape[1]


@pytest.mark.parametrize("name,opts", FORMATS)
def test_default_never_worse_than_rtn_on_its_objective(name, opts):
    codec = get_codec(name)
    w = heavy_tailed(48, 96, seed=3)
    params, info = search_scales(codec, w, **opts)
    rtn = codec.fake_quantize(w, **opts)
    e_rtn = float(((w - rtn) ** 2).sum())
    assert info["rtn_error"] == pytest.approx(e_rtn, rel=1e-5)
    assert info["error"] <= info["rtn_error"]
    deq = codec.dequantize(quantize_weight(codec, w, "default", **opts), (48, 96), torch.float32, **opts)
    assert float(((w - deq) ** 2).sum()) <= e_rtn * (1 + 1e-6)
    assert torch.equal(deq, fake_quant(codec, w, params, **opts))


@pytest.mark.parametrize("name,opts,factor", [("bnb_nf4", {"blocksize": 64}, 0.97), ("bnb_fp4", {"blocksize": 64}, 0.99),
                                              ("int8_tensorwise", {}, 0.99)])
def test_clipping_pays_off_for_uniform_and_4bit_grids(name, opts, factor):
    codec = get_codec(name)
    g = torch.Generator().manual_seed(5)
    chi2 = 2 * torch.rand(64, 128, generator=g).clamp_min(1e-3).log().neg()  # chi-square, 2 dof
    w = torch.randn(64, 128, generator=g) / (chi2 / 2).sqrt() * 0.01  # Student t, 2 dof: heavy tails
    _, info = search_scales(codec, w, **opts)
    assert not info["used_rtn"]
    assert info["error"] < factor * info["rtn_error"]


def test_weighted_objective_never_worse():
    codec = get_codec("nvfp4")
    w = heavy_tailed(32, 64, seed=7)
    cw = torch.linspace(0.01, 4.0, 64)
    params, info = search_scales(codec, w, col_weight=cw)
    e = float((((w - fake_quant(codec, w, params)) ** 2) * cw).sum())
    e_rtn = float((((w - codec.fake_quantize(w)) ** 2) * cw).sum())
    assert e <= e_rtn and info["error"] == pytest.approx(e, rel=1e-5)


def test_all_zero_blocks_stay_zero():
    codec = get_codec("mxfp8")
    w = heavy_tailed(8, 64)
    w[:, :32] = 0
    deq = codec.dequantize(quantize_weight(codec, w, "default"), (8, 64))
    assert bool((deq[:, :32] == 0).all()) and bool(torch.isfinite(deq).all())


def test_methods_and_unknown_method():
    assert METHODS[:3] == ("rtn", "default", "gptq")
    with pytest.raises(ValueError, match="unknown rounding method"):
        quantize_weight(get_codec("float8_e4m3fn"), heavy_tailed(4, 8), "magic")
