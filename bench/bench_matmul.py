"""Per-layer matmul time of every HybridQuant path against bf16 ``F.linear``, measured in the same run.

    python bench/bench_matmul.py [--out bench/RESULTS_H100.md]

Needs a CUDA GPU (numbers are only meaningful there); bitsandbytes for the NF4 rows. For M in
{1, 256, 4096} and Flux-like (K, N) it prints the median time (triton.testing.do_bench) of:

- ``bf16``: ``F.linear(x, w_bf16)``, the baseline; ratio = t_bf16 / t_path (> 1: faster than bf16).
- ``layer X``: ``ops.linear_paths.run`` -- the exact per-call dispatch of a HybridQuant Linear -- on a
  weight stored as X (fp8 = float8_e4m3fn, hybrid = Hybrid MXFP8 re-expressed as tensorwise FP8 at
  load, int8 = int8_tensorwise, nf4 = bitsandbytes NF4 nested); the path it took is printed.
- ``deq+bf16 X``: the generic fallback (codec dequantize, then ``F.linear``).
- ``fp8 gemm *-quant``: the tensorwise FP8 ``_scaled_mm`` with the dynamic activation scale computed
  by the fused Triton quantizer, ``torch.compile``, or eager torch (eager loses: measured, see README "Matmul paths").
- ``bnb matmul_4bit``: bitsandbytes' own entry point, for comparison.
Every layer output is checked against ``x @ dequant(W).T`` in float32 (relative error printed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from layer_shim import LayerShim as Shim
from layer_shim import bench, rel_err

from hybridquant.converter.formats import get_codec  # noqa: E402
from hybridquant.ops import linear_paths, matmul_fp8, quant_data  # noqa: E402

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]
MS = [1, 256, 4096]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
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
        w = torch.randn(N, K, device=dev) * 0.02
        w16 = w.to(torch.bfloat16)
        q8 = get_codec("float8_e4m3fn").quantize(w)
        qi8 = get_codec("int8_tensorwise").quantize(w)
        qh = get_codec("hybrid_mxfp8").quantize(w)
        wh, sh = quant_data.to_tensorwise("hybrid_mxfp8", qh, (N, K), "bench")
        th = {"weight": wh.to(dev), "weight_scale": sh.to(dev)}
        layers = {"fp8": (Shim("float8_e4m3fn", N, K), q8), "hybrid": (Shim("float8_e4m3fn", N, K), th),
                  "int8": (Shim("int8_tensorwise", N, K), qi8)}
        deq = {"fp8": get_codec("float8_e4m3fn").dequantize(q8, (N, K)), "hybrid": wh.float() * sh.to(dev),
               "int8": get_codec("int8_tensorwise").dequantize(qi8, (N, K))}
        if bnb is not None:
            packed, qs = bf.quantize_4bit(w16, blocksize=64, quant_type="nf4", compress_statistics=True)
            sdq = qs.as_dict(packed=True)
            t4 = {"weight": packed, **{f"weight.{k}": v for k, v in sdq.items()}}
            meta = quant_data.parse_json_tensor(sdq["quant_state.bitsandbytes__nf4"])
            layers["nf4"] = (Shim("bnb_nf4", N, K, bnb=meta, opts={"blocksize": 64}), t4)
            deq["nf4"] = bf.dequantize_4bit(packed, qs).float()
        for M in MS:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            r = {"M": M, "K": K, "N": N, "bf16": bench(lambda: F.linear(x, w16))}
            for key, (shim, tensors) in layers.items():
                fn = lambda shim=shim, tensors=tensors: linear_paths.run(shim, x, tensors, None, [])  # noqa: E731
                y = fn()
                r[f"layer {key}"] = bench(fn)
                r[f"path {key}"] = getattr(shim, "hq_last_path", "?")
                r[f"err {key}"] = rel_err(y, x.float() @ deq[key].t())
                r[f"deq+bf16 {key}"] = bench(lambda shim=shim, tensors=tensors: F.linear(x, shim.hq_dequantize(tensors, x.dtype)))
            r["fp8 gemm triton-quant"] = bench(lambda: matmul_fp8.fp8_linear(x, q8["weight"], q8["weight_scale"]))
            r["fp8 gemm compile-quant"] = bench(lambda: matmul_fp8.fp8_linear(x, q8["weight"], q8["weight_scale"], impl="compile"))
            r["fp8 gemm eager-quant"] = bench(lambda: matmul_fp8.fp8_linear(x, q8["weight"], q8["weight_scale"], impl="eager"))
            if bnb is not None:
                r["bnb matmul_4bit"] = bench(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs))
            rows.append(r)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    cols = ["layer fp8", "layer hybrid", "layer int8", "layer nf4", "deq+bf16 fp8", "deq+bf16 int8", "deq+bf16 nf4",
            "fp8 gemm triton-quant", "fp8 gemm compile-quant", "fp8 gemm eager-quant", "bnb matmul_4bit"]
    lines = [f"Device: {name}; torch {torch.__version__}; medians of triton.testing.do_bench; bf16 weights for the baseline.",
             "Cell: time in ms (speed-up vs bf16 F.linear in the same run, >1 = faster). 'layer X' = the HybridQuant",
             "layer's own per-call dispatch (ops/linear_paths.run) on a format-X weight; the path it took is in the",
             "'paths' column (fp8/hybrid/int8/nf4). 'deq+bf16 X' = codec dequantize + F.linear (the generic fallback).",
             "Errors: relative Frobenius error of the layer output vs x @ dequant(W).T in float32.", "",
             "| M | K | N | bf16 ms | " + " | ".join(cols) + " | paths | err fp8/hybrid/int8/nf4 |",
             "|---" * (4 + len(cols) + 2) + "|"]
    for r in rows:
        cells = [f"{r[c]:.4f} ({r['bf16'] / r[c]:.2f}x)" if c in r else "n/a" for c in cols]
        paths = "/".join(str(r.get(f"path {k}", "-")) for k in ("fp8", "hybrid", "int8", "nf4"))
        errs = "/".join(f"{r[f'err {k}']:.4f}" for k in ("fp8", "hybrid", "int8", "nf4") if f"err {k}" in r)
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['bf16']:.4f} | " + " | ".join(cells) + f" | {paths} | {errs} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
