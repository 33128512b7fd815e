"""The W8A8 Triton kernels (act_quant row quantizer, matmul_int8 epilogue, the fused W8A8 GEMM on
int8 and e4m3 codes) under the Triton interpreter on the CPU, against their pure-torch references.
``TRITON_INTERPRET=1`` must be set before triton is imported, so the checks run in a subprocess. The
interpreter's own e4m3 cast is wrong (it maps e.g. 124.3 to 64), but the kernels round to the e4m3
grid themselves first (``matmul_fp8.round_e4m3``, checked here against torch's cast), so FP8 codes
are bit-exact here too. Its bf16 cast truncates instead of rounding, so the epilogue is checked
bit-exact with a float32 output and to one bf16 ulp with a bf16 output."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from hybridquant.ops import act_quant as A, matmul_int8 as I, w8a8_gemm as G
    g = torch.Generator().manual_seed(0)
    # tails; the single-read form (K <= SINGLE_READ_MAX: one read per row); the two-sweep form
    # (K = 9000: 3 chunks of MAX_BLOCK); 37 rows = 37 programs
    for m, k in ((4, 7), (37, 64), (4, 300), (37, 300), (4, 5000), (4, 9000)):
        for dt in (torch.int8, torch.float8_e4m3fn):
            x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
            x[1] = 0
            a = x[2].float().abs().max()
            x[2, :3] = (torch.tensor([0.5, 1.5, -2.5]) * (a / 127)).to(torch.bfloat16)  # near ties
            q, s = A.quantize_rows_triton(x, dt)
            qr, sr = A.quantize_rows_ref(x, dt)
            assert q.dtype == dt and s.shape == (m, 1) and s.dtype == torch.float32
            assert torch.equal(s, sr), (k, dt)
            # e4m3 too: the kernel rounds to the e4m3 grid itself (matmul_fp8.round_e4m3), so even the
            # interpreter's cast of the result is exact
            assert torch.equal(q.view(torch.int8), qr.view(torch.int8)), (m, k, dt)
    exact = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 127.0, 3.5, 4.5]])
    q, s = A.quantize_rows_triton(exact, torch.int8)
    assert q.tolist() == [[0, 2, 2, 0, -2, 127, 4, 4]], q.tolist()  # ties to even
    for sw in (torch.tensor(0.01), torch.rand(40, 1, generator=g)):
        for bias in (None, torch.randn(40, generator=g).to(torch.bfloat16)):
            acc = torch.randint(-2**20, 2**20, (70, 40), generator=g, dtype=torch.int32)
            sx = torch.rand(70, 1, generator=g)
            y = I.epilogue(acc, sx, sw, bias, torch.float32)
            assert torch.equal(y, I.epilogue_ref(acc, sx, sw, bias, torch.float32))  # same fp32 math
            yb = I.epilogue(acc, sx, sw, bias, torch.bfloat16).float()
            torch.testing.assert_close(yb, y, rtol=2**-7, atol=0)  # interpreter: bf16 cast truncates
    for m, n, k, sw in ((3, 24, 40, torch.tensor(0.01)), (40, 72, 100, torch.rand(72, 1, generator=g))):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)  # fused INT8 GEMM: M < 17, K/N tails
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        b = torch.randn(n, generator=g)
        y = I.int8_linear_fused(x, w, sw, b, out_dtype=torch.float32, blocks=(16, 16, 32))
        xq, sx = A.quantize_rows_ref(x, torch.int8)
        acc = (xq.to(torch.int64) @ w.to(torch.int64).t()).to(torch.int32)
        assert torch.equal(y, I.epilogue_ref(acc, sx, sw, b, torch.float32))
    # the same kernel on e4m3 codes (made by torch's CPU cast, which is right): float32 sums of exact
    # products, so only the summation order differs from the float64 reference
    for m, n, k, sw in ((3, 24, 40, torch.tensor(0.01)), (40, 72, 100, torch.rand(72, 1, generator=g))):
        xq = (torch.randn(m, k, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
        w = (torch.randn(n, k, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
        sx, b = torch.rand(m, 1, generator=g), torch.randn(n, generator=g)
        for sxx in (sx, torch.tensor(0.37)):  # per-token scales, one tensorwise scale (stride 0)
            y = G.gemm(xq, sxx, w, sw, b, torch.float32, blocks=(16, 16, 32))
            ref = G.epilogue_ref(xq.double() @ w.double().t(), sxx, sw, b, torch.float32)
            torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    # round_e4m3 against torch's cast: random values at several scales, every e4m3 value, the midpoints
    # between neighbours and their float32 neighbours (where a double rounding goes wrong), +-0, +-448
    import triton
    import triton.language as tl
    from hybridquant.ops.matmul_fp8 import round_e4m3

    @triton.jit
    def _r(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mk = offs < n
        tl.store(y_ptr + offs, round_e4m3(tl.load(x_ptr + offs, mask=mk, other=0.0)), mask=mk)

    e4 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4 = torch.sort(e4[torch.isfinite(e4)].unique()).values
    mid = (e4[1:] + e4[:-1]) / 2
    x = torch.cat([torch.randn(20000, generator=g) * s for s in (0.003, 0.02, 1.0, 30.0, 200.0)]
                  + [e4, mid, mid.nextafter(torch.tensor(1e9)), mid.nextafter(torch.tensor(-1e9)),
                     torch.tensor([0.0, -0.0, 448.0, -448.0, 1.0625 + 2**-20])]).clamp(-448, 448)
    y = torch.empty_like(x)
    _r[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), 1024)
    assert torch.equal(y.view(torch.int32), x.to(torch.float8_e4m3fn).float().view(torch.int32))
    print("OK")
""")


def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
