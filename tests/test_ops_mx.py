"""SM >= 10 block-scaled MXFP8 path WITHOUT a Blackwell GPU: the capability is MOCKED
(``capabilities.override_capability``) and ``matmul_mx._scaled_mm`` is replaced by an emulator that
checks the arguments cuBLAS needs (e4m3 operands, e8m0 scales in the blocked layout, BlockWise1x32,
SWIZZLE_32_4_4, second operand column-major) and computes the product from exactly those arguments
with the mxfp8 codec's decoder, on CPU. Numerics vs the dequantized reference: the activation is
quantized to MXFP8 (e4m3, 3 mantissa bits: <= 2^-4 relative per element), bound 0.05 relative.
"""

from __future__ import annotations

import ops_helpers as H
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.comfyui


def test_path_decision_by_capability(comfy):
    from hybridquant.ops import capabilities as caps

    assert caps.decide_path((10, 0)) == caps.PATH_MX
    assert caps.decide_path((12, 0)) == caps.PATH_MX
    assert caps.decide_path((9, 0)) == caps.PATH_FP8
    assert caps.decide_path((8, 9)) == caps.PATH_FP8
    assert caps.decide_path((8, 6)) == caps.PATH_DEQUANT
    assert caps.decide_path(None) == caps.PATH_DEQUANT


def test_mx_path_arguments_and_numerics_mocked(comfy, monkeypatch):
    from hybridquant.converter.formats import get_codec
    from hybridquant.ops import capabilities as caps
    from hybridquant.ops import matmul_mx

    calls = []

    def emulate(a, b, *, scale_a, scale_recipe_a, scale_b, scale_recipe_b, swizzle_a, swizzle_b, output_dtype):
        assert a.dtype == b.dtype == torch.float8_e4m3fn
        assert scale_a.dtype == scale_b.dtype == torch.float8_e8m0fnu
        assert scale_recipe_a == scale_recipe_b == F.ScalingType.BlockWise1x32
        assert swizzle_a == swizzle_b == F.SwizzleType.SWIZZLE_32_4_4
        assert a.stride(1) == 1 and b.stride(0) == 1  # row-major A, column-major B
        assert a.shape[1] % 32 == 0 and a.shape[1] == b.shape[0]
        codec = get_codec("mxfp8")
        da = codec.dequantize({"weight": a, "weight_scale": scale_a.view(torch.uint8)}, tuple(a.shape))
        wt = b.t()
        dw = codec.dequantize({"weight": wt, "weight_scale": scale_b.view(torch.uint8)}, tuple(wt.shape))
        calls.append(tuple(a.shape))
        return (da @ dw.t()).to(output_dtype)

    monkeypatch.setattr(matmul_mx, "_scaled_mm", emulate)
    caps.override_capability("cpu", (10, 0))
    try:
        for case in ("mxfp8", "hybrid_mxfp8"):
            sd, ref = H.build({"a": case, "b": case, "c": case})
            m = H.load_ours(sd)
            assert m.a.hq_format == case  # stays MX: no re-expression on SM >= 10
            x = H.inputs()
            y = m(x)
            assert m.a.hq_paths["cpu"] == "mx" and len(calls) >= 3
            y_ref = H.reference_model(ref)(x)
            err = float((y - y_ref).norm() / y_ref.norm())
            assert err < 0.05, err
    finally:
        caps.clear_overrides()


def test_hopper_reexpression_and_fp8_path_on_cpu(comfy, monkeypatch):
    """Capability mocked as SM 9.0: MX weights become tensorwise FP8 at load and run torch._scaled_mm
    (which has a CPU implementation); outputs vs the dequantized reference (bound 0.05, as above)."""
    from hybridquant.ops import capabilities as caps
    from hybridquant.ops import matmul_fp8

    monkeypatch.setattr(matmul_fp8, "MIN_ROWS", 1)
    caps.override_capability("cpu", (9, 0))
    try:
        sd, ref = H.build({"a": "hybrid_mxfp8", "b": "float8_e4m3fn", "c": "mxfp8"})
        m = H.load_ours(sd)
        assert m.a.hq_format == "float8_e4m3fn" and m.a.weight.shape == (96, 80)
        x = H.inputs()
        y = m(x)
        assert m.a.hq_paths["cpu"] == "fp8"  # 96x80: K, N multiples of 16
        assert m.b.hq_paths["cpu"] == "dequant"  # N = 40: cuBLAS FP8 needs multiples of 16
        y_ref = H.reference_model(ref)(x)
        assert float((y - y_ref).norm() / y_ref.norm()) < 0.05
    finally:
        caps.clear_overrides()


def test_full_precision_matrix_mult_and_runtime_demotion(comfy, monkeypatch, caplog):
    """SM 9.0 mocked: a layer flagged full_precision_matrix_mult never takes the FP8 GEMM; a fast path
    that raises at run time demotes that layer once, with one log line, and the output stays right."""
    import logging

    from hybridquant.converter import metadata as qmeta
    from hybridquant.ops import capabilities as caps
    from hybridquant.ops import matmul_fp8

    monkeypatch.setattr(matmul_fp8, "MIN_ROWS", 1)
    caps.override_capability("cpu", (9, 0))
    try:
        sd, ref = H.build({"a": "float8_e4m3fn", "b": "float8_e4m3fn", "c": "float8_e4m3fn"})
        sd_fp = dict(sd)  # layer a (96x80) would take the FP8 GEMM without the flag
        sd_fp["a.comfy_quant"] = qmeta.encode_comfy_quant({"format": "float8_e4m3fn", "full_precision_matrix_mult": True})
        m = H.load_ours(sd_fp)
        x = H.inputs()
        y_ref = H.reference_model(ref)(x)
        y = m(x)
        assert m.a.hq_fp_mm and m.a.hq_last_path == "dequant"
        torch.testing.assert_close(m.a(x), H.reference_model(ref).a(x), rtol=1e-6, atol=1e-6)

        calls = []

        def broken(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED (simulated)")

        monkeypatch.setattr(matmul_fp8, "fp8_linear_prepared", broken)  # the layer path (linear_paths._fast)
        m2 = H.load_ours(sd)
        with caplog.at_level(logging.WARNING, logger="hybridquant.ops"):
            y1 = m2(x)
            y2 = m2(x)
        torch.testing.assert_close(y1, y_ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(y1, y2)
        assert len(calls) == 1  # only layer a has FP8-capable shapes; it tried once, then stayed demoted
        lines = [r for r in caplog.records if "path failed" in r.getMessage()]
        assert len(lines) == 1 and lines[0].getMessage().startswith("HybridQuant: a:")
        del y
    finally:
        caps.clear_overrides()


def test_mx_layers_reexpress_on_first_run_on_a_tensorwise_gpu(comfy, monkeypatch):
    """Loaded where MX dequantizes (plain CPU), then run on a device with the tensorwise FP8 path (SM 9.0
    mocked on the CPU): the layer re-expresses itself on that first call and takes the FP8 GEMM; the
    result equals a model re-expressed at load. A layer whose weight the patcher rewrote first keeps
    its MX codes (the patcher's backup would restore MX codes into it) and dequantizes."""
    from hybridquant.ops import capabilities as caps
    from hybridquant.ops import matmul_fp8

    monkeypatch.setattr(matmul_fp8, "MIN_ROWS", 1)
    sd, _ = H.build({"a": "hybrid_mxfp8", "b": None, "c": "mxfp8"})
    x = H.inputs()
    lazy = H.load_ours(sd)
    patched = H.load_ours(sd)
    assert lazy.a.hq_format == "hybrid_mxfp8" and lazy.a.hq_mx_pending
    lazy(x)  # plain CPU: dequantizes, stays pending (a later GPU may re-express)
    assert lazy.a.hq_mx_pending and lazy.a.hq_last_path == "dequant"
    patched.a.set_weight(patched.a.convert_weight(patched.a.weight.to(torch.float32)))  # e.g. a merged LoRA
    caps.override_capability("cpu", (9, 0))
    try:
        at_load = H.load_ours(sd)
        assert at_load.a.hq_format == "float8_e4m3fn"
        y = lazy(x)
        assert lazy.a.hq_format == "float8_e4m3fn" and not lazy.a.hq_mx_pending
        assert lazy.a.hq_paths["cpu"] == "fp8" and lazy.a.hq_last_path == "fp8"
        torch.testing.assert_close(y, at_load(x), rtol=0, atol=0)
        patched(x)
        assert patched.a.hq_format == "hybrid_mxfp8" and patched.a.hq_last_path == "dequant"
    finally:
        caps.clear_overrides()
