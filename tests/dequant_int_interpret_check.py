"""Run by tests/test_dequant_int.py in a subprocess with TRITON_INTERPRET=1 (must be set before Triton
is imported): the int5/int6 Triton dequantize on CPU against the codec. Prints one line per check,
exits 1 on any failure. The GPU test in test_dequant_int.py reuses its cases."""

from __future__ import annotations

import os
import sys

import torch

from hybridquant.converter.formats import get_codec
from hybridquant.ops import dequant_int as dq


class Layer:
    def __init__(self, fmt, n, k, opts):
        self.hq_format, self.out_features, self.in_features, self.hq_opts = fmt, n, k, opts


def weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :8] = 0.0  # an all-zero group (scale 1.0) when the group is 8 wide
    w[1, 3] = 0.4  # an outlier: its group's other codes are small
    w[2, :] *= 1e-6  # tiny scales: float16 subnormal products
    w[3, :] *= 1e7  # scales clamp to float16's max, codes saturate, fp16 products overflow to inf
    return w


def cases():
    # (rows, in_features, group): padded columns (N % g), several column tiles (N > 128), rows not a
    # multiple of the 16-row tile, groups of 8 (the smallest: one high-plane byte of 5-bit codes)
    for n, k, g in ((37, 200, 32), (20, 136, 8), (17, 64, 64), (5, 300, 128)):
        for fmt in dq.FORMATS:
            q = get_codec(fmt).quantize(weight(n, k, n + k + g), group_size=g)
            yield f"{fmt} {n}x{k} g={g}", Layer(fmt, n, k, {"group_size": g}), q, fmt


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (CPU) or via the GPU test"
    bad = 0
    for name, layer, q, fmt in cases():
        shape = (layer.out_features, layer.in_features)
        codec = get_codec(fmt)
        ref32 = codec.dequantize(q, shape, torch.float32, **layer.hq_opts)
        for dtype in (torch.bfloat16, torch.float16):
            y = dq.dequantize(layer, q, dtype)
            want = ref32.to(dtype)
            ok = y.shape == want.shape and torch.equal(y.view(torch.int16), want.view(torch.int16))
            # the codec's own dtype path (the fallback) agrees too
            ok_codec = torch.equal(codec.dequantize(q, shape, dtype, **layer.hq_opts).view(torch.int16), want.view(torch.int16))
            print(f"dequant {name} {dtype}: {'ok' if ok else 'MISMATCH'}{'' if ok_codec else ' CODEC PATH MISMATCH'}")
            bad += (not ok) + (not ok_codec)
        # both high-bit / scale loads (gathered, vectorized) and another tile shape, bf16 only
        g = layer.hq_opts["group_size"]
        want = ref32.to(torch.bfloat16)
        for tile in ((16, 128, 4), (8, 64, 2)):
            for vec in (False, True):
                if vec and not dq.vectorized(g, tile[1]):
                    continue
                y = dq.dequantize_int(fmt, q, shape, layer.hq_opts, torch.bfloat16, tile=tile, vec=vec)
                ok = torch.equal(y.view(torch.int16), want.view(torch.int16))
                print(f"tile {tile} vec={vec} {name}: {'ok' if ok else 'MISMATCH'}")
                bad += not ok
        x = torch.randn(3, layer.in_features).to(torch.bfloat16)
        y = dq.dequant_linear(layer, x, q, None).float()
        ref = torch.nn.functional.linear(x, ref32.to(torch.bfloat16)).float()
        ok = torch.equal(y, ref)
        print(f"linear {name}: {'ok' if ok else 'MISMATCH'}")
        bad += not ok
    print("FAILURES", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
