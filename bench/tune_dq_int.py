"""Tile sweep of the INT5/INT6 dequantize kernel (ops/dequant_int.py) at Flux's weight shapes, against
bitsandbytes' NF4 dequantize of the same shape and a bf16 copy of the output size, same process.

    python bench/tune_dq_int.py [--formats int5_groupwise,int6_groupwise] [--json FILE]

Needs a CUDA GPU and Triton (bitsandbytes optional: without it the NF4 column is empty). For each
(format, [N, K]) it times every (BLOCK_R, BLOCK_C, num_warps) x {gathered, vectorized} high-bit/scale
loads (triton.testing.do_bench medians, ms), checks each result bit-exact against the module's
current ``TILE``, and prints the best tile per shape, its effective bandwidth (bytes read + written /
time) and ``vs nf4`` = bnb dequantize_4bit time / best time (>= 1: no slower than NF4's dequantize).
The last line is the tile that is best summed over all shapes: the candidate for ``TILE``.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from hybridquant.converter.formats import get_codec
from hybridquant.ops import dequant_int

SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]  # [N, K]
ROWS = (8, 16, 32, 64)
COLS = (128, 256, 512)
WARPS = (4, 8)


def nf4_ms(shape, do_bench):
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
    q, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return do_bench(lambda: bnbf.dequantize_4bit(q, st))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="int5_groupwise,int6_groupwise")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import functools

    from triton.testing import do_bench

    do_bench = functools.partial(do_bench, warmup=5, rep=20)

    results = []
    totals: dict = {}
    for fmt in a.formats.split(","):
        codec = get_codec(fmt)
        for n, k in SHAPES:
            w = torch.randn(n, k, device="cuda") * 0.02
            q = {key: t.cuda() for key, t in codec.quantize(w.cpu(), group_size=32).items()}
            opts = {"group_size": 32}
            ref = dequant_int.dequantize_int(fmt, q, (n, k), opts)
            moved = sum(t.numel() * t.element_size() for t in q.values()) + ref.numel() * 2
            base = do_bench(lambda: dequant_int.dequantize_int(fmt, q, (n, k), opts))
            nf4 = nf4_ms((n, k), do_bench)
            copy = do_bench(lambda: ref.clone())
            best = None
            for r, c, nw, vec in itertools.product(ROWS, COLS, WARPS, (False, True)):
                if vec and not dequant_int.vectorized(32, c):
                    continue
                tile = (r, c, nw)

                def f(tile=tile, vec=vec):
                    return dequant_int.dequantize_int(fmt, q, (n, k), opts, tile=tile, vec=vec)

                try:
                    y = f()
                except Exception as e:  # noqa: BLE001 - a tile the compiler refuses (registers, smem)
                    print(f"  {fmt} {n}x{k} {tile} vec={vec}: {type(e).__name__}")
                    continue
                if not torch.equal(y.view(torch.int16), ref.view(torch.int16)):
                    raise SystemExit(f"{fmt} {n}x{k} tile {tile} vec={vec}: not bit-exact against TILE")
                ms = do_bench(f)
                t, cnt = totals.get((tile, vec), (0.0, 0))
                totals[(tile, vec)] = (t + ms, cnt + 1)
                if best is None or ms < best[0]:
                    best = (ms, tile, vec)
            ms, tile, vec = best
            row = {"format": fmt, "shape": [n, k], "current_tile": list(dequant_int.TILE), "current_ms": base,
                   "best_tile": list(tile), "best_vec": vec, "best_ms": ms, "nf4_dequant_ms": nf4,
                   "bf16_copy_ms": copy, "best_gbps": moved / ms / 1e6}
            results.append(row)
            vs = f"{nf4 / ms:.2f}" if nf4 else "-"
            print(f"{fmt} [{n}, {k}]: current {dequant_int.TILE} {base * 1e3:.1f} us | best {tile} vec={vec} "
                  f"{ms * 1e3:.1f} us ({base / ms:.2f}x, {moved / ms / 1e6:.0f} GB/s) | nf4 dequant "
                  f"{(nf4 or 0) * 1e3:.1f} us (vs nf4 {vs}) | bf16 clone {copy * 1e3:.1f} us", flush=True)
    full = {key: t for key, (t, cnt) in totals.items() if cnt == len(results)}  # tiles that ran on every shape
    (tile, vec), tot = min(full.items(), key=lambda kv: kv[1])
    cur = sum(r["current_ms"] for r in results)
    print(f"best over all shapes: TILE = {tile} vec={vec}: {tot * 1e3:.0f} us summed vs current {cur * 1e3:.0f} us")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": results,
                       "best_overall": {"tile": list(tile), "vec": vec, "sum_ms": tot, "current_sum_ms": cur}},
                      fh, indent=1)


if __name__ == "__main__":
    main()
