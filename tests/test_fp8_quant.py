"""The FP8 activation quantizers of ops/matmul_fp8.py: the one-launch Triton kernel (CPU interpreter,
one program; GPU, the full cooperative grid) against the eager reference, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_onepass_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("fp8_quant_interpret_check.py")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "FAILURES 0" in r.stdout and r.stdout.count("onepass ") == 8


def test_onepass_matches_eager_and_two_kernel_on_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from hybridquant.ops import matmul_fp8 as m

    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((1, 64), (17, 3072), (4096, 3072), (4608, 12288)):
        x = (torch.randn(shape, device="cuda", generator=g) * 3).to(torch.bfloat16)
        x.view(-1)[shape[1] // 2] = 250.0  # the amax sits in one program's share only
        for static in (None, torch.tensor(0.07)):
            y1, s1 = m.quantize_activation(x, static, impl="triton")
            s1 = s1.clone()  # a per-stream slot: the next one-pass call overwrites it
            assert x.device not in m._onepass_refused, "cooperative launch refused on this GPU"
            y2, s2 = m.quantize_activation(x, static, impl="triton2")
            y3, s3 = m.quantize_activation(x, static, impl="eager")
            for name, y, s in (("two-kernel", y2, s2), ("eager", y3, s3)):
                off = int((y1.view(torch.uint8) != y.view(torch.uint8)).sum())
                assert torch.equal(s1.reshape(()), s.reshape(())), (name, shape, static, float(s1), float(s))
                assert off == 0, (name, shape, static, off, y1.numel())
            assert torch.equal(m._workspace(x.device)[0], torch.zeros(3, dtype=torch.int32, device="cuda"))
    # CUDA graph capture and replay, then a change of input inside the captured buffer
    x = torch.randn(512, 3072, device="cuda", dtype=torch.bfloat16)
    m.quantize_activation(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg, sg = m.quantize_activation(x)
    for scale in (1.0, 5.0):
        x.mul_(scale)
        graph.replay()
        y3, s3 = m.quantize_activation(x, impl="eager")
        assert torch.equal(yg.view(torch.uint8), y3.view(torch.uint8)) and torch.equal(sg.reshape(()), s3.reshape(()))
