"""Run by tests/test_fp8_quant.py in a subprocess with TRITON_INTERPRET=1 (set before Triton is
imported): the one-pass FP8 activation quantizer (ops/matmul_fp8.py) on CPU against the eager
reference. The interpreter runs a grid's programs one after another, so a grid barrier can only be
exercised with one program here (the GPU test runs the full grid); the calls in a row check that
the kernel leaves its workspace zeroed. The interpreter's float32 -> e4m3 cast is not torch's
(ties round away from zero, and values just below a power of two drop to the lower binade: 127.2 ->
64, not 128; the two-kernel quantizer shows the same under the interpreter), so codes are compared bit
for bit with that quantizer run here and only loosely (within a factor 2) with the eager reference;
the GPU test (tests/test_fp8_quant.py) is bit-exact against eager. Prints one line per check, exits 1 on any failure."""

from __future__ import annotations

import sys

import torch

from hybridquant.ops import matmul_fp8 as m


def run(x, input_scale=None, ws=None):
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty((), dtype=torch.float32)
    static = input_scale is not None
    m._quant_onepass_kernel[(1,)](x, y, ws, scale, x.numel(), 1, float(input_scale) if static else 1.0,
                                  USE_STATIC=static, BLOCK=256, ITERS=-(-x.numel() // 256))
    return y, scale


def two_kernel(x, input_scale=None):
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty((), dtype=torch.float32)
    bits = torch.zeros(1, dtype=torch.int32)
    grid = (-(-x.numel() // 4096),)
    if input_scale is None:
        m._amax_kernel[grid](x, bits, x.numel(), BLOCK=4096)
    m._quant_kernel[grid](x, y, bits, scale, x.numel(), 1.0 if input_scale is None else float(input_scale),
                          USE_STATIC=input_scale is not None, BLOCK=4096)
    return y, scale


def main():
    failures = 0
    ws = torch.zeros(3, dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    cases = [("randn 7x300", torch.randn(7, 300, generator=g)),
             ("outlier 5x64", torch.randn(5, 64, generator=g).index_put_((torch.tensor([2]), torch.tensor([9])),
                                                                          torch.tensor(300.0))),
             ("zeros 3x32", torch.zeros(3, 32)),
             ("bf16 9x100", torch.randn(9, 100, generator=g).to(torch.bfloat16))]
    for name, x in cases:
        for static in (None, 0.05):
            y, s = run(x, static, ws)
            y_ref, s_ref = m._quantize_eager(x, None if static is None else torch.tensor(static))
            y2, _ = two_kernel(x, static)
            yf, rf = y.float().abs(), y_ref.float().abs()
            ok = (torch.equal(y.view(torch.uint8), y2.view(torch.uint8)) and bool(((yf <= rf * 2) & (rf <= yf * 2)).all())
                  and torch.equal(s, s_ref.reshape(())) and torch.equal(ws, torch.zeros(3, dtype=torch.int32)))
            failures += not ok
            print(f"onepass {name} static={static}: {'ok' if ok else 'FAIL'} scale {float(s):.6g} ref {float(s_ref):.6g}")
    print(f"FAILURES {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
