"""The 4-bit Triton kernels (ops/dequant4.py) on CPU under the Triton interpreter, and their dispatch.

The kernels run in a subprocess (``dequant4_interpret_check.py``): TRITON_INTERPRET must be set before
Triton is imported, and other modules of this process import it first. There: dequantize is bit-exact
against the codecs' dequantize cast to bf16/fp16 (NVFP4 incl. padded shapes and two scale tiles,
bitsandbytes NF4/FP4 nested or not, block sizes 32/64); the GEMV is within a derived bound of
``x @ dequant(W).T`` (see the check script)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the check script, imported by the GPU test

pytest.importorskip("triton")


def test_kernels_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("dequant4_interpret_check.py")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "FAILURES 0" in r.stdout
    assert r.stdout.count("dequant ") >= 20 and r.stdout.count("gemv ") >= 10


def test_bad_layout_is_a_clear_error():
    import torch

    from hybridquant.ops import dequant4

    t = {"weight": torch.zeros(16, 4, dtype=torch.uint8), "weight_scale": torch.zeros(512, dtype=torch.float8_e4m3fn),
         "weight_scale_2": torch.ones(())}
    with pytest.raises(ValueError, match="nvfp4 weight must be contiguous uint8 \\[16, 8\\]"):
        dequant4.dequantize_nvfp4(t, (16, 16))


class _Layer:
    def __init__(self, fmt, bnb):
        self.hq_format, self.hq_bnb, self.out_features, self.in_features = fmt, bnb, 64, 32


@pytest.mark.parametrize("fmt", ["nvfp4", "bnb_nf4", "bnb_fp4"])
def test_dispatch_picks_dq4_and_per_call_thresholds(fmt, monkeypatch):
    import torch

    from hybridquant.ops import capabilities as caps
    from hybridquant.ops import dequant4, dispatch, linear_paths

    monkeypatch.setattr(caps, "features", lambda device: (caps.FEATURE_FP8, caps.FEATURE_TRITON, caps.FEATURE_CUDA))
    monkeypatch.setattr(caps, "bnb_cuda_available", lambda device: True)
    assert dispatch.kernel_for(fmt, "cpu") == dispatch.KERNEL_DQ4
    monkeypatch.setattr(caps, "features", lambda device: (caps.FEATURE_CUDA,))  # no Triton / SM < 8.9
    assert dispatch.kernel_for(fmt, "cpu") == ("bnb" if fmt.startswith("bnb") else dispatch.DEQUANT)
    layer = _Layer(fmt, {"blocksize": 64} if fmt.startswith("bnb") else None)
    bnb = ["bnb"] if fmt.startswith("bnb") else []
    monkeypatch.setattr(dequant4, "GEMV_MAX_ROWS", 16)  # the rule, independent of the measured default
    monkeypatch.setattr(dequant4, "BNB_FIRST", False)
    for rows, want in ((1, ["dq4_gemv", "dq4"]), (16, ["dq4_gemv", "dq4"]), (17, ["dq4"]), (4096, ["dq4"])):
        x = torch.zeros(rows, 32, dtype=torch.bfloat16)
        assert linear_paths.per_call("dq4", layer, x) == want + bnb + ["dequant"]
    monkeypatch.setattr(dequant4, "BNB_FIRST", True)
    assert linear_paths.per_call("dq4", layer, torch.zeros(2, 32, dtype=torch.bfloat16)) == bnb + ["dq4_gemv", "dq4", "dequant"]
    assert linear_paths.per_call("dq4", layer, torch.zeros(2, 32)) == bnb + ["dequant"]  # fp32: no kernels


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_on_gpu_bit_exact_and_gemv_bound():
    """Same checks as the interpreter run, compiled for the GPU (native e4m3 loads, no FMA in the nested
    absmax, bf16 dot): dequantize bit-exact vs the codec on the same device; GEMV within the bound."""
    import dequant4_interpret_check as chk
    import torch

    from hybridquant.converter.formats import get_codec
    from hybridquant.ops import dequant4 as dq

    for name, layer, q, fmt in chk.cases():
        q = {k: v.cuda() for k, v in q.items()}
        shape = (layer.out_features, layer.in_features)
        ref32 = get_codec(fmt).dequantize(q, shape, torch.float32)
        for dtype in (torch.bfloat16, torch.float16):
            y = dq.dequantize(layer, q, dtype)
            assert torch.equal(y.view(torch.int16), ref32.to(dtype).view(torch.int16)), (name, dtype)
        if layer.in_features % 2:
            continue
        for m in (1, 16):
            x = torch.randn(m, layer.in_features, device="cuda").to(torch.bfloat16)
            y = dq.gemv(layer, x, q, None).double()
            ref = x.double() @ ref32.double().t()
            tol = (2**-8 + layer.in_features * 2**-24) * (x.double().abs() @ ref32.double().abs().t()) + 2**-8 * ref.abs() + 1e-30
            assert bool(((y - ref).abs() <= tol).all()), (name, m)
