"""The int5/int6 Triton dequantize (ops/dequant_int.py) on CPU under the Triton interpreter, its
dispatch, and the codec's torch dequantize (the fallback on every other device).

The kernel runs in a subprocess (``dequant_int_interpret_check.py``): TRITON_INTERPRET must be set
before Triton is imported, and other modules of this process import it first. There: bit-exact against
the codec's float32 dequantize cast to bf16/fp16, for padded columns, several column tiles, groups of
8 to 128, zero / subnormal / saturated scales (fp16 overflow to inf)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the check script, imported by the GPU test

from hybridquant.converter.formats import get_codec  # noqa: E402
from hybridquant.converter.formats._intpack import signed_codes, unpack_codes  # noqa: E402

FORMATS = ("int5_groupwise", "int6_groupwise")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_triton(), reason="needs triton")
def test_kernel_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("dequant_int_interpret_check.py")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "FAILURES 0" in r.stdout
    assert r.stdout.count("dequant ") == 16 and r.stdout.count("linear ") == 8


@pytest.mark.parametrize("fmt", FORMATS)
def test_codec_dtype_path_is_float32_rounded_once(fmt):
    """The torch dequantize in bf16/fp16 (one int8 x scale multiply written in the dtype) equals the
    float32 decode rounded once, incl. padded columns and float16 overflow."""
    c = get_codec(fmt)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(9, 70, generator=g) * 0.05
    w[2] *= 1e7  # saturated scale: fp16 products overflow
    w[3] *= 1e-6  # subnormal products
    q = c.quantize(w, group_size=32)
    ref32 = c.dequantize(q, (9, 70), torch.float32, group_size=32)
    assert ref32.shape == (9, 70)
    for dtype in (torch.bfloat16, torch.float16):
        y = c.dequantize(q, (9, 70), dtype, group_size=32)
        assert y.dtype == dtype and torch.equal(y.view(torch.int16), ref32.to(dtype).view(torch.int16))
    bits = c.bits
    u = unpack_codes(q["weight"], bits)
    assert torch.equal(signed_codes(q["weight"], bits).to(torch.int16), u.to(torch.int16) - (1 << (bits - 1)))


@pytest.mark.skipif(not _has_triton(), reason="needs triton")
def test_bad_layout_is_a_clear_error():
    from hybridquant.ops import dequant_int

    t = {"weight": torch.zeros(4, 16, dtype=torch.uint8), "weight_scale": torch.ones(4, 1, dtype=torch.float16)}
    with pytest.raises(ValueError, match=r"int5_groupwise weight must be uint8 \[4, 20\]"):
        dequant_int.dequantize_int("int5_groupwise", t, (4, 32), {"group_size": 32})
    with pytest.raises(ValueError, match="not a layout of this module"):
        dequant_int.dequantize_int("nvfp4", t, (4, 32), {})


class _Layer:
    def __init__(self, fmt):
        self.hq_format, self.hq_bnb, self.out_features, self.in_features = fmt, None, 64, 32
        self.hq_opts = {"group_size": 32}


@pytest.mark.parametrize("fmt", FORMATS)
def test_dispatch_picks_dq_int(fmt, monkeypatch):
    from hybridquant.ops import capabilities as caps
    from hybridquant.ops import dispatch, linear_paths

    monkeypatch.setattr(caps, "features", lambda device: (caps.FEATURE_FP8, caps.FEATURE_TRITON, caps.FEATURE_CUDA))
    assert dispatch.kernel_for(fmt, "cpu") == dispatch.KERNEL_DQ_INT
    assert dispatch.KERNEL_DQ_INT in dispatch.LABELS
    monkeypatch.setattr(caps, "features", lambda device: (caps.FEATURE_CUDA,))  # no Triton / SM < 8.9
    assert dispatch.kernel_for(fmt, "cpu") == dispatch.DEQUANT
    layer = _Layer(fmt)
    for rows in (1, 4096):
        x = torch.zeros(rows, 32, dtype=torch.bfloat16)
        assert linear_paths.per_call(dispatch.KERNEL_DQ_INT, layer, x) == ["dq_int", "dequant"]
    assert linear_paths.per_call(dispatch.KERNEL_DQ_INT, layer, torch.zeros(2, 32)) == ["dequant"]  # fp32 activations


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_on_gpu_bit_exact():
    """Same checks as the interpreter run, compiled for the GPU: bit-exact vs the codec on the same
    device, and the layer's dispatch runs the kernel."""
    import dequant_int_interpret_check as chk

    from hybridquant.ops import dequant_int as dq
    from hybridquant.ops import dispatch, linear_paths

    for name, layer, q, fmt in chk.cases():
        q = {k: v.cuda() for k, v in q.items()}
        shape = (layer.out_features, layer.in_features)
        ref32 = get_codec(fmt).dequantize(q, shape, torch.float32, **layer.hq_opts)
        for dtype in (torch.bfloat16, torch.float16):
            y = dq.dequantize(layer, q, dtype)
            assert torch.equal(y.view(torch.int16), ref32.to(dtype).view(torch.int16)), (name, dtype)
    layer.hq_paths, layer.hq_fp_mm, layer.hq_name, layer.hq_bnb = {}, False, "gpu test", None
    layer.hq_dequantize = lambda t, dtype: get_codec(fmt).dequantize(t, shape, dtype, **layer.hq_opts)
    x = torch.randn(7, layer.in_features, device="cuda").to(torch.bfloat16)
    y = linear_paths.run(layer, x, q, None, [])
    want = dispatch.KERNEL_DQ_INT if dispatch.kernel_for(fmt, x.device) == dispatch.KERNEL_DQ_INT else "dequant"
    assert layer.hq_last_path == want
    torch.testing.assert_close(y, torch.nn.functional.linear(x, ref32.to(torch.bfloat16)), rtol=0, atol=0)
