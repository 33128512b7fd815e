"""W8A8 paths on the CPU: quantizer / epilogue reference semantics, the CPU int8 GEMM end to end, and
the dispatch decisions per (mocked) capability. The Triton kernels: tests/test_w8a8_triton.py."""

from __future__ import annotations

import types

import pytest
import torch

from hybridquant.ops import act_quant, capabilities, dispatch, linear_paths, matmul_fp8, matmul_int8


def test_int8_rows_spec():
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5, -127.0, 3.49], [0.0] * 6], dtype=torch.bfloat16)
    q, s = act_quant.quantize_rows_ref(x, torch.int8)
    assert s.dtype == torch.float32 and s.shape == (2, 1)
    assert s[0, 0] == 1.0 and s[1, 0] == 1.0  # amax 127 -> 1; all-zero row -> 1, never 0
    assert q[0].tolist() == [127, 0, 2, -2, -127, 3]  # ties to even, not away from zero
    assert q[1].tolist() == [0] * 6


def test_int8_rows_clamp_and_roundtrip():
    x = torch.randn(8, 100, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    q, s = act_quant.quantize_rows_ref(x, torch.int8)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (q.float() * s - x.float()).abs()
    assert bool((err <= s / 2 + 1e-6).all())


def test_fp8_rows_spec():
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    q, s = act_quant.quantize_rows_ref(x, torch.float8_e4m3fn)
    torch.testing.assert_close(s, x.float().abs().amax(1, keepdim=True) / 448, rtol=0, atol=0)
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.float().abs().amax(1), torch.full((4,), 448.0))


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        act_quant.quantize_rows_ref(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="dtype"):
        act_quant.quantize_rows_ref(torch.zeros(2, 3), torch.float16)
    with pytest.raises(ValueError, match="multiples of 8"):
        matmul_int8.int8_linear(torch.zeros(32, 12), torch.zeros(8, 12, dtype=torch.int8), torch.ones(()))
    with pytest.raises(ValueError, match="16 rows"):
        matmul_int8.int8_linear(torch.zeros(4, 16), torch.zeros(8, 16, dtype=torch.int8), torch.ones(()))
    with pytest.raises(ValueError, match="one per output row"):
        matmul_fp8.row_scale_b(torch.ones(3), 8)


@pytest.mark.parametrize("per_row", [False, True])
def test_int8_linear_cpu_matches_manual(per_row):
    """CPU torch._int_mm + the reference epilogue equals the spelled-out math (exact int32 GEMM)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 64, generator=g).to(torch.bfloat16)
    w = torch.randint(-127, 128, (24, 64), generator=g, dtype=torch.int8)
    sw = torch.rand(24, 1, generator=g) * 0.01 if per_row else torch.tensor(0.003)
    b = torch.randn(24, generator=g).to(torch.bfloat16)
    y = matmul_int8.int8_linear(x, w, sw, b)
    xq, sx = act_quant.quantize_rows_ref(x, torch.int8)
    acc = xq.to(torch.int64) @ w.to(torch.int64).t()
    manual = ((acc.float() * sx) * sw.reshape(1, -1) + b.float()).to(torch.bfloat16)
    assert torch.equal(y, manual)
    ref = x.float() @ (w.float() * sw.reshape(-1, 1)).t() + b.float()
    assert float((y.float() - ref).norm() / ref.norm()) < 0.02


def test_row_scale_b():
    assert matmul_fp8.row_scale_b(torch.tensor(2.0), 4).tolist() == [[2.0] * 4]
    s = torch.arange(4.0).reshape(4, 1)
    assert matmul_fp8.row_scale_b(s, 4).shape == (1, 4) and matmul_fp8.row_scale_b(s, 4).is_contiguous()


@pytest.fixture
def cap():
    yield lambda c: capabilities.override_capability("cpu", c)
    capabilities.clear_overrides()


@pytest.mark.parametrize("c, int8, fp8_row", [((9, 0), "int8", "fp8_rowwise"), ((8, 9), "int8", "fp8_rowwise"),
                                              ((8, 0), "int8", "dequant"), ((7, 5), "dequant", "dequant"),
                                              (None, "dequant", "dequant")])
def test_dispatch_per_capability(cap, c, int8, fp8_row):
    cap(c)
    assert dispatch.kernel_for("int8_tensorwise", "cpu") == int8
    assert dispatch.kernel_for("float8_e4m3fn_rowwise", "cpu") == fp8_row
    assert dispatch.kernel_for("int8_blockwise", "cpu") == "dequant"


def _layer(fmt, n=32, k=64):
    return types.SimpleNamespace(hq_format=fmt, out_features=n, in_features=k, hq_fp_mm=False, hq_paths={},
                                 hq_name="t", hq_static_input_scale=None)


def test_per_call_thresholds(cap):
    cap((9, 0))
    lay = _layer("int8_tensorwise")
    big = torch.zeros(linear_paths.INT8_MIN_ROWS, 64, dtype=torch.bfloat16)
    small = torch.zeros(linear_paths.INT8_MIN_ROWS - 1, 64, dtype=torch.bfloat16)
    assert linear_paths._pick(lay, big) == "int8"
    assert linear_paths.per_call("int8", lay, big) == ["int8", "dequant"]  # CPU: no GEMV / cast paths
    assert linear_paths.per_call("int8", lay, small) == ["dequant"]
    assert linear_paths.per_call("fp8_rowwise", lay, big)[0] == "fp8_rowwise"
    assert linear_paths.per_call("int8", lay, big.float()) == ["dequant"]
    fp8 = _layer("float8_e4m3fn")
    assert linear_paths.per_call("fp8", fp8, big) == ["fp8", "dequant"]  # the FP8 GEMM from 17 rows too
    assert linear_paths.per_call("fp8", fp8, small) == ["dequant"]  # (CUDA: GEMV / cast + GEMM)
    odd = _layer("int8_tensorwise", n=20)
    assert linear_paths._pick(odd, big) == "dequant"  # N not a multiple of 8


def test_tensorwise_as_rowwise_switch(cap, monkeypatch):
    """Tensorwise FP8 runs the row-wise GEMM from FP8_AS_ROWWISE_MIN_ROWS rows (bf16/fp16 activations,
    SM 8.9+), with the tensorwise GEMM as its fallback; fewer rows keep the tensorwise GEMM."""
    cap((9, 0))
    lay = _layer("float8_e4m3fn")
    many = torch.zeros(linear_paths.FP8_AS_ROWWISE_MIN_ROWS, 64, dtype=torch.bfloat16)
    fewer = many[:-1]
    assert linear_paths.per_call("fp8", lay, many) == ["fp8_rowwise", "fp8", "dequant"]
    assert linear_paths.per_call("fp8", lay, fewer) == ["fp8", "dequant"]
    assert linear_paths.per_call("fp8", lay, many.float()) == ["fp8", "dequant"]  # row-wise writes bf16
    static = _layer("float8_e4m3fn")
    static.hq_static_input_scale = 0.5  # the file's calibrated activation scale: the tensorwise GEMM uses it
    assert linear_paths.per_call("fp8", static, many) == ["fp8", "dequant"]
    cap((8, 0))  # no FP8 row-wise GEMM below SM 8.9
    assert linear_paths.per_call("fp8", lay, many)[0] == "fp8"
    cap((9, 0))
    monkeypatch.setattr(linear_paths, "TENSORWISE_AS_ROWWISE", False)
    assert linear_paths.per_call("fp8", lay, many) == ["fp8", "dequant"]


def test_fp8_rowwise_triton_switch(cap, monkeypatch):
    """With FP8_ROWWISE_TRITON (FP8_TENSORWISE_TRITON) the fused Triton GEMM runs first, row-wise
    (tensorwise) _scaled_mm is its fallback; an e5m2 weight (the kernel multiplies codes of one dtype)
    keeps _scaled_mm only."""
    cap((9, 0))
    monkeypatch.setattr(linear_paths, "FP8_ROWWISE_TRITON", True)
    row = _layer("float8_e4m3fn_rowwise")
    x = torch.zeros(linear_paths.FP8_ROWWISE_MIN_ROWS, 64, dtype=torch.bfloat16)
    assert linear_paths.per_call("fp8_rowwise", row, x)[:2] == ["fp8_row_triton", "fp8_rowwise"]
    tw = _layer("float8_e4m3fn")
    many = torch.zeros(linear_paths.FP8_AS_ROWWISE_MIN_ROWS, 64, dtype=torch.bfloat16)
    assert linear_paths.per_call("fp8", tw, many) == ["fp8_row_triton", "fp8_rowwise", "fp8", "dequant"]
    e5m2 = _layer("float8_e5m2")
    e5m2.weight = torch.zeros(32, 64, dtype=torch.float8_e5m2)
    assert linear_paths.per_call("fp8", e5m2, many) == ["fp8_rowwise", "fp8", "dequant"]
    monkeypatch.setattr(linear_paths, "FP8_ROWWISE_TRITON", False)
    assert linear_paths.per_call("fp8_rowwise", row, x)[0] == "fp8_rowwise"
    # the tensorwise switch: below FP8_AS_ROWWISE_MIN_ROWS, and as the row-wise GEMMs' fallback
    monkeypatch.setattr(linear_paths, "FP8_TENSORWISE_TRITON", True)
    assert linear_paths.per_call("fp8", tw, many[:-1]) == ["fp8_triton", "fp8", "dequant"]
    assert linear_paths.per_call("fp8", tw, many) == ["fp8_rowwise", "fp8_triton", "fp8", "dequant"]
    assert linear_paths.per_call("fp8", e5m2, many[:-1]) == ["fp8", "dequant"]


def test_run_int8_on_cpu_with_mocked_capability(cap, monkeypatch):
    """The dispatch runs the real int8 path (CPU _int_mm) and caches nothing per call."""
    cap((9, 0))
    monkeypatch.setattr(linear_paths, "INT8_MIN_ROWS", 17)  # the rule at _int_mm's minimum, small test
    lay = _layer("int8_tensorwise", n=16, k=32)
    lay.hq_dequantize = lambda t, dt: t["weight"].float() * t["weight_scale"]
    g = torch.Generator().manual_seed(4)
    w = torch.randint(-127, 128, (16, 32), generator=g, dtype=torch.int8)
    t = {"weight": w, "weight_scale": torch.rand(16, 1, generator=g) * 0.01}
    x = torch.randn(2, 20, 32, generator=g).to(torch.bfloat16)
    y = linear_paths.run(lay, x, t, None, [])
    assert lay.hq_last_path == "int8" and y.shape == (2, 20, 16) and y.dtype == torch.bfloat16
    ref = x.float() @ (w.float() * t["weight_scale"]).t()
    assert float((y.float() - ref).norm() / ref.norm()) < 0.02


def test_w8a8_gemm_configs_per_accumulation():
    """The e4m3 GEMM with fp32 promotion drops the config that spills on SM 9.0 (128 x 256 x 64); int8
    and fast accumulation keep every config."""
    pytest.importorskip("triton")
    from hybridquant.ops import w8a8_gemm as G

    configs = G._w8a8_kernel.configs
    kept = G._prune(configs, {"IS_FP8": True, "FAST_ACC": False})
    assert len(kept) == len(configs) - 1
    assert all((c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) != (256, 64) for c in kept)
    assert G._prune(configs, {"IS_FP8": True, "FAST_ACC": True}) == configs
    assert G._prune(configs, {"IS_FP8": False, "FAST_ACC": False}) == configs
