"""Per-layer matmul time of every HybridQuant path against bf16 ``F.linear``, measured in the same run.

    python bench/bench_matmul.py [--out bench/RESULTS_H100.md]

Needs a CUDA GPU (numbers are only meaningful there); bitsandbytes for the NF4 rows. Prints, for
M in {1, 256, 4096} and Flux-like (K, N), the median time (triton.testing.do_bench) of:

- ``bf16``: ``F.linear(x, w_bf16)`` -- the baseline, ratio = t_bf16 / t_path (> 1: faster than bf16)
- ``fp8 dyn``: tensorwise FP8 ``_scaled_mm`` with the fused Triton activation quantizer (dynamic scale)
- ``fp8 dyn compile`` / ``fp8 dyn eager``: same GEMM, activation scale by torch.compile / eager torch
- ``hybrid->fp8``: a Hybrid MXFP8 weight re-expressed as tensorwise FP8 at load, then the FP8 path
- ``nf4 bnb``: bitsandbytes ``matmul_4bit`` on the NF4 weight
- ``deq+bf16 fp8`` / ``deq+bf16 nf4``: the dequantize-per-call fallback (our codecs) then bf16
Correctness of every fast path is checked against the dequantized weight in float32 (relative
Frobenius error printed as ``err``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


from hybridquant.converter.formats import get_codec  # noqa: E402
from hybridquant.ops import matmul_fp8, quant_data  # noqa: E402

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]
MS = [1, 256, 4096]


def bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def rel_err(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
    except Exception as e:  # noqa: BLE001
        bnb = None
        print(f"bitsandbytes unavailable: {e}")
    rows = []
    name = torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}, capability {torch.cuda.get_device_capability()}")
    for K, N in SHAPES:
        w = (torch.randn(N, K, device=dev) * 0.02)
        w16 = w.to(torch.bfloat16)
        q8 = get_codec("float8_e4m3fn").quantize(w)
        w8, s8 = q8["weight"], q8["weight_scale"]
        try:
            qh = get_codec("hybrid_mxfp8").quantize(w)
        except Exception:  # codec not present: plain MXFP8 + the largest block scale
            qh = get_codec("mxfp8").quantize(w)
        wh, sh = quant_data.to_tensorwise("hybrid_mxfp8" if "weight_scalar" in qh else "mxfp8", qh, (N, K), "bench")
        wh, sh = wh.to(dev), sh.to(dev)
        w_deq8 = get_codec("float8_e4m3fn").dequantize(q8, (N, K))
        if bnb is not None:
            packed, qs = bf.quantize_4bit(w16, blocksize=64, quant_type="nf4", compress_statistics=True)
            w_deq4 = bf.dequantize_4bit(packed, qs).float()
        for M in MS:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            t_bf16 = bench(lambda: F.linear(x, w16))
            ref8 = x.float() @ w_deq8.t()
            r = {"M": M, "K": K, "N": N, "bf16": t_bf16}
            for impl in ("triton", "compile", "eager"):
                fn = lambda impl=impl: matmul_fp8.fp8_linear(x, w8, s8, impl=impl)  # noqa: E731
                r[f"fp8 {impl}"] = bench(fn)
                r[f"fp8 {impl} err"] = rel_err(fn(), ref8)
            refh = x.float() @ (wh.float() * sh).t()
            r["hybrid->fp8"] = bench(lambda: matmul_fp8.fp8_linear(x, wh, sh))
            r["hybrid err"] = rel_err(matmul_fp8.fp8_linear(x, wh, sh), refh)
            r["hybrid weight err"] = rel_err(wh.float() * sh, get_codec("mxfp8").dequantize(
                {k: v for k, v in qh.items() if k in ("weight", "weight_scale")}, (N, K)))
            r["deq+bf16 fp8"] = bench(lambda: F.linear(x, (w8.to(torch.bfloat16) * s8.to(torch.bfloat16))))
            if bnb is not None:
                fn4 = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs)  # noqa: E731
                r["nf4 bnb"] = bench(fn4)
                r["nf4 err"] = rel_err(fn4(), x.float() @ w_deq4.t())
                r["deq+bf16 nf4"] = bench(lambda: F.linear(x, bf.dequantize_4bit(packed, qs)))
            rows.append(r)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    for r in rows:  # what the layer runs: linear_paths applies matmul_fp8.worth_it per call
        r["fp8 layer"] = r["fp8 triton"] if matmul_fp8.worth_it(r["M"], r["N"], r["K"]) else r["deq+bf16 fp8"]
        if "nf4 bnb" in r:
            r["nf4 layer"] = r["nf4 bnb"] if r["M"] == 1 else r["deq+bf16 nf4"]
    cols = ["fp8 layer", "nf4 layer", "fp8 triton", "fp8 compile", "fp8 eager", "hybrid->fp8", "deq+bf16 fp8", "nf4 bnb", "deq+bf16 nf4"]
    lines = [f"Device: {name}; torch {torch.__version__}; times are medians of triton.testing.do_bench.",
             "Each cell: time in ms (speed-up vs bf16 F.linear measured in the same run; >1 = faster).",
             "'fp8 layer' / 'nf4 layer': the column the layer's per-call rule picks (FP8 GEMM when M >= 1024 and",
             "N*K >= 16M, else dequantize+bf16; bitsandbytes GEMV for M = 1, else bitsandbytes dequantize+bf16).", "",
             "| M | K | N | bf16 ms | " + " | ".join(cols) + " | fp8 err | hybrid err | nf4 err |",
             "|---" * (4 + len(cols) + 3) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            if c in r:
                cells.append(f"{r[c]:.4f} ({r['bf16'] / r[c]:.2f}x)")
            else:
                cells.append("n/a")
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['bf16']:.4f} | " + " | ".join(cells) +
                     f" | {r['fp8 triton err']:.4f} | {r['hybrid err']:.4f} | {r.get('nf4 err', float('nan')):.4f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
