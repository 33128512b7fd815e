"""GPU paths of our ops against the dequantized reference (runs only where CUDA is present; the H100
results are in bench/RESULTS_H100.md).

Tolerances (relative Frobenius error of the layer output vs ``x @ dequant(W).T`` in float32):
- FP8 tensorwise path: the activation is quantized to e4m3 (3 mantissa bits, relative rounding error
  <= 2^-4 per element, ~2^-4/sqrt(3) RMS); bf16 output adds 2^-8. Bound 0.05.
- MXFP8 / Hybrid re-expressed to tensorwise: same, plus the re-expression (exact for blocks within
  range of the scalar). Bound 0.05.
- bitsandbytes, 4-bit Triton (dq4: weight bit-exact in bf16) and dequantize paths: weight exact, bf16
  activations/output: bound 0.01.
"""

from __future__ import annotations

import ops_helpers as H
import pytest
import torch

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

D_IN, D_HID, D_OUT = 256, 512, 128


class Wide(torch.nn.Module):
    def __init__(self, ops):
        super().__init__()
        self.a = ops.Linear(D_IN, D_HID, bias=True)
        self.b = ops.Linear(D_HID, D_OUT, bias=False)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


EXPECTED = {"float8_e4m3fn": "fp8", "float8_e4m3fn+input_scale": "fp8", "mxfp8": "fp8", "hybrid_mxfp8": "fp8",
            "bnb_nf4": "dq4", "bnb_nf4+nested": "dq4", "bnb_fp4": "dq4", "int8_tensorwise": "dequant",
            "float8_e4m3fn_rowwise": "dequant", "int8_blockwise": "dequant", "nvfp4": "dq4"}


SCALE_OUT = {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fn_rowwise", "int8_tensorwise", "mxfp8", "hybrid_mxfp8"}


def _sd(case):
    g = torch.Generator().manual_seed(3)
    sd, ref = {}, {}
    for name, i, o, bias in (("a", D_IN, D_HID, True), ("b", D_HID, D_OUT, False)):
        w = torch.randn(o, i, generator=g) * 0.05
        t, r = H.quantize_layer(name, w, case)
        sd.update(t)
        ref[name] = r
        if bias:
            sd[f"{name}.bias"] = torch.randn(o, generator=g) * 0.1
            ref[f"{name}.bias"] = sd[f"{name}.bias"]
    return sd, ref


@pytest.mark.parametrize("case", list(EXPECTED))
def test_gpu_path_matches_reference(comfy, case, monkeypatch):
    import comfy.model_management

    import hybridquant.ops as ops

    # The in-process ComfyUI was started with --cpu; a real GPU session loads with the GPU as its
    # torch device, which is what decides the load-time MX -> tensorwise re-expression.
    monkeypatch.setattr(comfy.model_management, "get_torch_device", lambda: torch.device("cuda"))
    from hybridquant.ops import matmul_fp8

    monkeypatch.setattr(matmul_fp8, "MIN_ROWS", 65)  # the FP8 GEMM at 128 rows on these small layers
    monkeypatch.setattr(matmul_fp8, "MIN_WORK", 1)

    if case in H.CODEC_CASES and not H.codec_available(case.split("+")[0]):
        pytest.skip("codec missing")
    sd, ref = _sd(case)
    m = Wide(ops.choose_ops(sd.keys(), {}))
    m.load_state_dict(ops.prepare_state_dict(sd, {}))
    m.to("cuda")
    x = torch.randn(128, D_IN, device="cuda", dtype=torch.bfloat16)
    y = m(x)
    assert m.a.hq_paths["cuda:0"] == EXPECTED[case], (m.a.hq_paths, m.a.hq_format)
    h = torch.nn.functional.gelu(x.float() @ ref["a"].cuda().t() + ref["a.bias"].cuda())
    y_ref = h @ ref["b"].cuda().t()
    err = float((y.float() - y_ref).norm() / y_ref.norm())
    bound = 0.05 if EXPECTED[case] == "fp8" else 0.01
    if EXPECTED[case] == "fp8":
        assert m.a.hq_last_path == "fp8"
    print(f"{case}: path {EXPECTED[case]}, rel err {err:.5f}")
    assert err < bound
    # few rows (text encoders, single-token steps): 8-bit GEMV / cast+GEMM+scale for the scale-out formats
    for rows, expect in ((4, "gemv"), (64, "scaled_dequant")):
        xs = x[:rows]
        ys = m.b(torch.nn.functional.gelu(m.a(xs)))
        if case.split("+")[0] in SCALE_OUT:
            assert m.a.hq_last_path == expect, (rows, m.a.hq_last_path)
        if EXPECTED[case] == "dq4":  # 4-bit Triton kernels (SM 8.9+): GEMV for few rows, dequantize + GEMM above
            assert m.a.hq_last_path == ("dq4_gemv" if rows <= 16 else "dq4"), (rows, m.a.hq_last_path)
        hs = torch.nn.functional.gelu(xs.float() @ ref["a"].cuda().t() + ref["a.bias"].cuda())
        ys_ref = hs @ ref["b"].cuda().t()
        err_s = float((ys.float() - ys_ref).norm() / ys_ref.norm())
        print(f"  {rows} rows: {m.a.hq_last_path}, rel err {err_s:.5f}")
        assert err_s < bound
    # cpu <-> cuda round trip keeps the outputs identical
    m.to("cpu")
    m.to("cuda")
    torch.testing.assert_close(m(x), y, rtol=0, atol=0)
