"""W8A8 paths (per-token activations) per layer against bf16 ``F.linear``, measured in the same run.

    python bench/bench_w8a8.py [--json bench/RESULTS_W8A8_H200.json] [--ms 1,16,256,1024,4096,4608]

Needs a CUDA GPU (SM 8.0+ for INT8, 8.9+ for FP8). Flux.1 shapes (K, N). Median times
(``triton.testing.do_bench``) of, per (M, K, N):

- ``bf16``: ``F.linear(x, w_bf16)``, the baseline; every ratio is t_bf16 / t_path (> 1: faster).
- ``int8 tensor`` / ``int8 row``: ``matmul_int8.int8_linear`` (one-launch int8 row quantizer,
  ``torch._int_mm``, Triton epilogue) on ``int8_tensorwise`` without / with ``per_row``; M <= 16 is
  skipped (``_int_mm`` refuses it). ``int8 fused``: ``matmul_int8.int8_linear_fused`` (one Triton INT8
  GEMM with the epilogue fused, per-row weight; every M), not used by the layers until measured.
- ``fp8 rowwise``: ``matmul_fp8.fp8_rowwise_linear`` on ``float8_e4m3fn_rowwise``;
  ``fp8 tw-as-row``: the same GEMM on a tensorwise FP8 weight (scale expanded once);
  ``fp8 tensorwise``: today's tensorwise path (two-launch quantizer, ``matmul_fp8.fp8_linear``) --
  the issue wants row-wise within 5% of this.
- ``layer X``: ``linear_paths.run`` (the layer's own dispatch with the thresholds in linear_paths) and
  the path it took.
- ``quant int8`` / ``quant fp8``: the row quantizer alone.
Each path's output is checked against ``x @ dequant(W).T`` in float32 (relative error in the JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from layer_shim import LayerShim, bench, rel_err

from hybridquant.converter.formats import get_codec
from hybridquant.ops import act_quant, linear_paths, matmul_fp8, matmul_int8

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 9216), (15360, 3072)]
MS = [1, 16, 256, 1024, 4096, 4608]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None, help="write the rows as JSON to this file")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}, capability {torch.cuda.get_device_capability()}")
    rows = []
    for K, N in SHAPES:
        w = torch.randn(N, K, device=dev) * 0.02
        w16 = w.to(torch.bfloat16)
        fmts = {"int8 tensor": ("int8_tensorwise", {}), "int8 row": ("int8_tensorwise", {"per_row": True}),
                "fp8 rowwise": ("float8_e4m3fn_rowwise", {}), "fp8 tensorwise": ("float8_e4m3fn", {})}
        q = {key: get_codec(f).quantize(w, **o) for key, (f, o) in fmts.items()}
        deq = {key: get_codec(f).dequantize(q[key], (N, K), **o) for key, (f, o) in fmts.items()}
        sb_row = matmul_fp8.row_scale_b(q["fp8 rowwise"]["weight_scale"], N)
        sb_tw = matmul_fp8.row_scale_b(q["fp8 tensorwise"]["weight_scale"], N)
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            t = lambda key: (q[key]["weight"], q[key]["weight_scale"])  # noqa: E731
            fns = {
                "fp8 rowwise": lambda: matmul_fp8.fp8_rowwise_linear(x, q["fp8 rowwise"]["weight"], sb_row),
                "fp8 tw-as-row": lambda: matmul_fp8.fp8_rowwise_linear(x, q["fp8 tensorwise"]["weight"], sb_tw),
                "fp8 tensorwise": lambda: matmul_fp8.fp8_linear(x, *t("fp8 tensorwise")),
                "quant fp8": lambda: act_quant.quantize_rows(x, torch.float8_e4m3fn),
            }
            if M >= matmul_int8.MIN_ROWS:
                fns["int8 tensor"] = lambda: matmul_int8.int8_linear(x, *t("int8 tensor"))
                fns["int8 row"] = lambda: matmul_int8.int8_linear(x, *t("int8 row"))
                fns["quant int8"] = lambda: act_quant.quantize_rows(x, torch.int8)
            fns["int8 fused"] = lambda: matmul_int8.int8_linear_fused(x, *t("int8 row"))
            for key in ("int8 row", "fp8 rowwise", "fp8 tensorwise"):
                shim = LayerShim(fmts[key][0], N, K, opts=fmts[key][1])
                fns[f"layer {key}"] = lambda shim=shim, key=key: linear_paths.run(shim, x, q[key], None, [])
                fns[f"layer {key}"]()
                fns[f"layer {key}"].shim = shim
            bf16 = bench(lambda: F.linear(x, w16))
            r = {"M": M, "K": K, "N": N, "bf16_ms": bf16, "paths": {}, "ms": {}, "speed_vs_bf16": {}, "rel_err": {}}
            for key, fn in fns.items():
                y = fn()
                r["ms"][key] = bench(fn)
                r["speed_vs_bf16"][key] = bf16 / r["ms"][key]
                if hasattr(fn, "shim"):
                    r["paths"][key] = fn.shim.hq_last_path
                ref_key = {"fp8 tw-as-row": "fp8 tensorwise", "int8 fused": "int8 row"}.get(key, key.removeprefix("layer "))
                if not key.startswith("quant"):
                    ref = x.float() @ deq[ref_key].t()
                    r["rel_err"][key] = rel_err(y, ref)
            tw, rw = r["ms"]["fp8 tensorwise"], r["ms"]["fp8 rowwise"]
            r["rowwise_vs_tensorwise"] = tw / rw
            rows.append(r)
            cells = " ".join(f"{k}={v:.2f}x" for k, v in r["speed_vs_bf16"].items())
            print(f"M={M} K={K} N={N} bf16 {bf16:.4f} ms | {cells} | rowwise/tensorwise {tw / rw:.2f}x | "
                  f"paths {r['paths']}", flush=True)
    if args.json:
        out = {"device": name, "torch": torch.__version__, "capability": list(torch.cuda.get_device_capability()),
               "thresholds": {"INT8_MIN_ROWS": linear_paths.INT8_MIN_ROWS,
                              "FP8_ROWWISE_MIN_ROWS": linear_paths.FP8_ROWWISE_MIN_ROWS,
                              "TENSORWISE_AS_ROWWISE": linear_paths.TENSORWISE_AS_ROWWISE},
               "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
