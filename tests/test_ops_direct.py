"""The direct call (ops/direct.py): layers whose tensors already sit on the input's device, unpatched,
skip ComfyUI's ``cast_bias_weight``; everything else keeps it. Outputs must be bit-identical to the
cast path (both end in the same kernels with the same tensors)."""

from __future__ import annotations

import ops_helpers as H
import pytest
import torch

pytestmark = pytest.mark.comfyui

CASES = ["float8_e4m3fn", "int8_tensorwise+per_row", "mxfp8", "nvfp4", "bnb_nf4"]


@pytest.fixture
def counted(comfy, monkeypatch):
    """Counts calls of ComfyUI's cast_bias_weight (the layers call it through ``comfy.ops``)."""
    import comfy.ops

    import hybridquant.ops  # noqa: F401

    calls = []
    real = comfy.ops.cast_bias_weight

    def counting(s, *a, **kw):
        calls.append(type(s).__name__)
        return real(s, *a, **kw)

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", counting)
    return calls


@pytest.mark.parametrize("case", CASES)
def test_unpatched_layers_skip_cast_and_match_cast_path(counted, case):
    sd, _ = H.build({"a": case, "b": case, "c": None})
    m = H.load_ours(sd)
    x = H.inputs()
    y = m(x)
    assert counted == [], "no layer of a model on the input's device needs cast_bias_weight"
    assert m.a.__dict__["hq_direct"] is not None
    ref = H.load_ours(sd)
    y_cast = ref.c(torch.nn.functional.gelu(ref.b.forward_comfy_cast_weights(
        torch.nn.functional.gelu(ref.a.forward_comfy_cast_weights(x)))))
    torch.testing.assert_close(y, y_cast, rtol=0, atol=0)


def test_patched_or_other_dtype_layers_keep_cast_path(counted):
    sd, _ = H.build({"a": "float8_e4m3fn", "b": None, "c": None})
    m = H.load_ours(sd)
    x = H.inputs()
    y0 = m(x)
    assert counted == []
    m.a.weight_function = [lambda w: w]  # a low-VRAM / LoRA patch: defined on the float weight
    m.b.weight_function = [lambda w: w]
    torch.testing.assert_close(m(x), y0, rtol=0, atol=0)
    assert counted.count("_Carrier") == 1 and len(counted) == 2  # a (carrier) and b (plain, stock)
    del m.a.weight_function, m.b.weight_function
    counted.clear()
    m(x.double())  # plain layers stored float32, input float64: stock casts them
    assert len(counted) == 2  # b and c; a dequantizes to the input's dtype on its own


def test_cache_follows_moves_and_new_weights(counted):
    sd, _ = H.build({"a": "int8_tensorwise", "b": None, "c": None})
    m = H.load_ours(sd)
    x = H.inputs()
    y0 = m(x)
    first = m.a.__dict__["hq_direct"]
    m.to("cpu")  # _apply: the cache is dropped, rebuilt on the next call
    assert m.a.__dict__["hq_direct"] is None
    torch.testing.assert_close(m(x), y0, rtol=0, atol=0)
    assert m.a.__dict__["hq_direct"] is not first
    w = m.a.weight
    m.a.weight = torch.nn.Parameter(torch.zeros_like(w), requires_grad=False)  # e.g. a patcher swap
    out = m.a(x)
    assert m.a.__dict__["hq_direct"][1] is m.a.weight
    torch.testing.assert_close(out, torch.zeros_like(out) + m.a.bias, rtol=0, atol=0)


def test_plain_norms_and_convs_direct_equal_stock(counted, comfy):
    import comfy.ops

    from hybridquant.ops import HybridQuantOps

    torch.manual_seed(0)
    for name, make, x in [
        ("LayerNorm", lambda ops: ops.LayerNorm(16), torch.randn(3, 16)),
        ("GroupNorm", lambda ops: ops.GroupNorm(2, 8), torch.randn(2, 8, 4, 4)),
        ("Conv2d", lambda ops: ops.Conv2d(8, 4, 3, padding=1), torch.randn(1, 8, 6, 6)),
    ]:
        ours, stock = make(HybridQuantOps), make(comfy.ops.manual_cast)
        for p_ours, p_stock in zip(ours.parameters(), stock.parameters()):
            with torch.no_grad():
                p_stock.copy_(torch.randn_like(p_stock))
                p_ours.copy_(p_stock)
        counted.clear()
        y = ours(x)
        assert counted == [], name
        torch.testing.assert_close(y, stock(x), rtol=0, atol=0)
        assert counted == [name], name  # the stock manual_cast layer did cast


def test_fp8_gemm_operands_cached_for_resident_weights_only(counted, monkeypatch):
    """The FP8 GEMM's ``w.t()`` / float32 scale are kept per layer for the direct call, dropped on a
    move (holding them would keep the old device's weight alive), and never kept for the cast path's
    per-call copies (an offloaded weight would stay pinned on the GPU)."""
    from hybridquant.ops import capabilities as caps
    from hybridquant.ops import matmul_fp8

    monkeypatch.setattr(matmul_fp8, "MIN_ROWS", 1)
    caps.override_capability("cpu", (9, 0))
    try:
        sd, _ = H.build({"a": "float8_e4m3fn", "b": None, "c": None})
        m = H.load_ours(sd)
        x = H.inputs()
        y0 = m(x)
        assert m.a.hq_last_path == "fp8"
        w, s, w_t, _ = m.a.hq_paths["fp8_operands"]
        assert w is m.a.weight and w_t.data_ptr() == w.data_ptr()
        torch.testing.assert_close(m(x), y0, rtol=0, atol=0)
        m.to("cpu")
        assert "fp8_operands" not in m.a.hq_paths
        from hybridquant.ops import direct

        # the cast path (here: as if dynamic VRAM managed the layer): per-call tensor dicts
        monkeypatch.setattr(direct, "managed", lambda layer: True)
        torch.testing.assert_close(m(x), y0, rtol=0, atol=0)
        assert counted and m.a.hq_last_path == "fp8" and "fp8_operands" not in m.a.hq_paths
    finally:
        caps.clear_overrides()
