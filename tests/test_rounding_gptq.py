"""GPTQ rounding (converter/rounding/gptq.py) against an independent reference computation."""

from __future__ import annotations

import pytest
import torch

from hybridquant.converter.formats import get_codec
from hybridquant.converter.rounding import gptq_choose, quantize_weight
from hybridquant.converter.rounding.gptq import gptq_round, output_error
from hybridquant.converter.rounding.scale_search import fake_quant

FORMATS = [
    ("float8_e4m3fn", {}),
    ("float8_e4m3fn_rowwise", {}),
    ("int8_tensorwise", {}),
    ("int8_tensorwise", {"per_row": True}),
    ("int8_blockwise", {"group_size": 16}),
    ("float8_e4m3fn_blockwise", {"group_size": 32}),
    ("mxfp8", {}),
    ("hybrid_mxfp8", {}),
    ("nvfp4", {}),
    ("bnb_nf4", {"blocksize": 64}),
    ("bnb_nf4", {"blocksize": 64, "double_quant": True}),
    ("bnb_fp4", {"blocksize": 64}),
]


def correlated_inputs(n: int, rows: int = 1024, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, n // 4, generator=g)
    mix = torch.randn(n // 4, n, generator=g)
    return base @ mix + 0.1 * torch.randn(rows, n, generator=g) * torch.linspace(0.2, 2.0, n)


def weight(m: int, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) * 0.02
    w[0, 3] = 0.3  # an outlier, as real weights have
    return w


def reference_gptq(w, s, h, round_fn, damp):
    """Unoptimised GPTQ/OBQ loop in float64 with an explicit inverse Hessian that is updated by the
    Gaussian-elimination step after each column (no Cholesky, no lazy blocks, no reordering)."""
    w = w.double().clone()
    n = w.shape[1]
    h = h.double() + damp * torch.diagonal(h.double()).mean() * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for j in range(n):
        q[:, j] = round_fn(w[:, j].float() / s[:, j]).double() * s[:, j].double()
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j + 1:] -= err.unsqueeze(1) * hinv[j, j + 1:].unsqueeze(0)
        # remove variable j from the inverse Hessian of the remaining ones
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q


@pytest.mark.parametrize("name,opts", [("int8_tensorwise", {}), ("float8_e4m3fn", {}), ("bnb_nf4", {"blocksize": 64})])
@pytest.mark.parametrize("block_size", [128, 5])
def test_gptq_matches_reference_loop(name, opts, block_size):
    codec = get_codec(name)
    m, n = 24, 48
    w = weight(m, n)
    x = correlated_inputs(n)
    h = x.T @ x / x.shape[0]
    params = codec.scale_params(w, **opts)
    s = codec.element_scale(params, (m, n), **opts)
    ours = gptq_round(codec, w, h, params, damp=0.01, block_size=block_size, act_order=False, device="cpu", **opts)
    ref = reference_gptq(w, s, h, lambda x: codec.round_to_grid(x, **opts), 0.01).float()
    # Same decisions up to float32-vs-float64 ties: nearly every element identical, the rest one
    # grid step apart, and the same output error.
    same = (ours == ref).float().mean().item()
    assert same > 0.97, same
    e_ours, e_ref = output_error(w, ours, h), output_error(w, ref, h)
    assert abs(e_ours - e_ref) <= 0.03 * e_ref


def test_gptq_with_diagonal_hessian_is_round_to_nearest():
    """With uncorrelated inputs the optimal update of the other columns is zero: GPTQ == RTN."""
    codec = get_codec("int8_tensorwise")
    w = weight(16, 40)
    h = torch.diag(torch.linspace(0.5, 3.0, 40))
    params = codec.scale_params(w)
    q = gptq_round(codec, w, h, params, device="cpu")
    assert torch.equal(q, fake_quant(codec, w, params))


def test_gptq_single_column_update_is_closed_form_optimum():
    """Two inputs: after rounding column 0, the best real-valued column 1 given q0 minimises
    E[(x0 (w0 - q0) + x1 (w1 - v))^2] -> v = w1 + (w0 - q0) H01 / H11. GPTQ (without dampening)
    must round exactly that v."""
    codec = get_codec("int8_tensorwise")
    w = torch.tensor([[0.37, -0.21], [0.05, 0.44]])
    h = torch.tensor([[2.0, 0.9], [0.9, 1.0]])
    params = {"weight_scale": torch.tensor(0.01)}
    q = gptq_round(codec, w, h, params, damp=0.0, act_order=False, device="cpu")
    q0 = torch.round(w[:, 0] / 0.01) * 0.01
    v = w[:, 1] + (w[:, 0] - q0) * h[0, 1] / h[1, 1]
    assert torch.allclose(q[:, 0], q0)
    assert torch.allclose(q[:, 1], torch.round(v / 0.01) * 0.01)


@pytest.mark.parametrize("name,opts", FORMATS)
def test_gptq_beats_rtn_and_stores_exactly(name, opts):
    codec = get_codec(name)
    m, n = 32, 64
    w = weight(m, n)
    x = correlated_inputs(n)
    h = x.T @ x / x.shape[0]
    stats = {"xtx": h, "sqmean": torch.diagonal(h).clone(), "absmax": x.abs().amax(0), "count": torch.tensor(x.shape[0])}
    q, params, info = gptq_choose(codec, w, stats, return_info=True, device="cpu", **opts)
    e_rtn = output_error(w, codec.fake_quantize(w, **opts), h)
    assert info["errors"]["gptq"] < e_rtn
    assert output_error(w, q, h) <= e_rtn
    tensors = quantize_weight(codec, w, "gptq", stats, device="cpu", **opts)
    deq = codec.dequantize(tensors, (m, n), torch.float32, **opts)
    assert torch.equal(deq, q)  # what GPTQ put on the grid is what the file holds


def test_gptq_needs_stats():
    with pytest.raises(ValueError, match="calibration"):
        quantize_weight(get_codec("float8_e4m3fn"), weight(4, 8), "gptq", None, name="blocks.0.fc")


def test_diag_only_stats_use_weighted_clipping():
    codec = get_codec("bnb_nf4")
    w = weight(16, 64)
    sq = torch.linspace(0.1, 5.0, 64)
    stats = {"sqmean": sq, "absmax": sq.sqrt(), "count": torch.tensor(10)}
    q, params, info = gptq_choose(codec, w, stats, return_info=True, blocksize=64)
    e_rtn = float((((w - codec.fake_quantize(w, blocksize=64)) ** 2) * sq).sum())
    assert float((((w - q) ** 2) * sq).sum()) <= e_rtn
