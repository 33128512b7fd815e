"""Run by tests/test_dequant4.py in a subprocess with TRITON_INTERPRET=1 (must be set before Triton is
imported): the 4-bit Triton kernels on CPU against the codecs. Prints one line per check, exits 1 on
any failure. The GPU test in test_dequant4.py reuses its cases."""

from __future__ import annotations

import os
import sys

import torch  # noqa: E402

from hybridquant.converter.formats import get_codec  # noqa: E402
from hybridquant.converter.formats.bnb4bit import read_quant_state  # noqa: E402
from hybridquant.ops import dequant4 as dq  # noqa: E402


class Layer:
    def __init__(self, fmt, n, k, meta=None):
        self.hq_format, self.out_features, self.in_features, self.hq_bnb = fmt, n, k, meta


def weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :16] = 0.0  # an all-zero block
    w[1, 3] = -1e-7  # rounds to -0 in NVFP4 (code 8)
    w[2, 5] = 0.4  # an outlier: other blocks get small / subnormal e4m3 scales
    return w


def cases():
    for n, k in ((40, 56), (33, 50), (130, 96)):  # padded NVFP4 rows/cols; 130 rows: two 128-row scale tiles
        w = weight(n, k, n + k)
        yield f"nvfp4 {n}x{k}", Layer("nvfp4", n, k), get_codec("nvfp4").quantize(w), "nvfp4"
        for qt in ("nf4", "fp4"):
            for nested in (False, True):
                for bs in ((64, 32) if n == 40 else (64,)):
                    c = get_codec(f"bnb_{qt}")
                    q = c.quantize(w, blocksize=bs, double_quant=nested)
                    meta = read_quant_state("l", q)
                    yield f"bnb_{qt} nested={nested} bs={bs} {n}x{k}", Layer(f"bnb_{qt}", n, k, meta), q, f"bnb_{qt}"


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (CPU) or via the GPU test"
    bad = 0
    for name, layer, q, fmt in cases():
        shape = (layer.out_features, layer.in_features)
        codec = get_codec(fmt)
        ref32 = codec.dequantize(q, shape, torch.float32)
        for dtype in (torch.bfloat16, torch.float16):
            y = dq.dequantize(layer, q, dtype)
            ok = torch.equal(y.view(torch.int16), ref32.to(dtype).view(torch.int16))
            print(f"dequant {name} {dtype}: {'ok' if ok else 'MISMATCH'}")
            bad += not ok
        if layer.in_features % 2:
            continue  # bitsandbytes GEMV needs an even in_features (checked in the pytest module)
        # GEMV against x @ dequant(W).T in float64. Bound per output element: the weight rounded to
        # bf16 (<= 2^-7 relative: the interpreter's own cast truncates; on GPU it rounds, 2^-8), the
        # bf16 output rounding (2^-8 of |y|) and float32 accumulation (K * 2^-24), all times sum |x||w|.
        for m in ((1, 17) if layer.out_features == 40 else (5,)):
            g = torch.Generator().manual_seed(m)
            x = torch.randn(m, layer.in_features, generator=g).to(torch.bfloat16)
            bias = torch.randn(layer.out_features, generator=g).to(torch.bfloat16) if m % 2 else None
            y = dq.gemv(layer, x, q, bias, config=(16, 32, 4)).double()
            ref = x.double() @ ref32.double().t() + (bias.double() if bias is not None else 0)
            mag = x.double().abs() @ ref32.double().abs().t()
            tol = (2**-7 + layer.in_features * 2**-24) * mag + 2**-8 * ref.abs() + 1e-30
            ok = bool(((y - ref).abs() <= tol).all()) and y.shape == (m, layer.out_features)
            print(f"gemv {name} M={m}: {'ok' if ok else 'OUT OF BOUND'} max err {(y - ref).abs().max():.3g}")
            bad += not ok
    print("FAILURES", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
