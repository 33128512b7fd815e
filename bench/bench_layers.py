"""GPU-only and host time per Linear call at every Flux shape, each 8-bit path against bf16 ``F.linear``.

    PYTHONPATH=<dir holding a hybridquant link> python bench/bench_layers.py [--json F] [--ms 256,512,...]

Why this and not ``bench_w8a8.py``: that one times with ``triton.testing.do_bench``, which on the H200
measured the host's launch rate for most of these shapes (an FP8 layer call needs more CPU time than
its kernels need GPU time at M <= 1024), so its ratios could not set the per-row thresholds in
``linear_paths``. Here both are measured apart, in the same process:

- ``gpu_us``: GPU time per call. ``torch.cuda._sleep`` first queues a GPU spin longer than the host
  needs to enqueue ``--calls`` calls, so the calls run back to back on the GPU between two events,
  whatever the host cost (a round whose enqueue outlasted the spin is repeated with a longer one).
  The weights rotate over enough copies to exceed the L2 cache twice, as in a model, where every
  layer's weight comes from DRAM.
- ``host_us``: CPU time per call (the same loop, wall clock, no synchronisation).
- ratios: bf16's time over the path's (> 1: faster than bf16).

Paths (the layers' own functions, not the dispatch, so each is timed at every M):
``bf16``; ``fp8`` tensorwise (one-launch quantizer + ``_scaled_mm``, what ``linear_paths`` runs);
``fp8_2k`` (the two-kernel quantizer, the CUDA-graph form); ``fp8_row`` (per-token activation scales,
row-wise ``_scaled_mm``); ``fp8_row_tr`` (the same codes through the fused W8A8 Triton GEMM,
``w8a8_gemm``: what ``float8_e4m3fn_rowwise`` and tensorwise weights with ``TENSORWISE_AS_ROWWISE``
run with ``FP8_ROWWISE_TRITON``); ``fp8_tr`` (the tensorwise codes of ``fp8`` through that GEMM,
``FP8_TENSORWISE_TRITON``); ``int8`` (fused Triton INT8 GEMM, per-token activations);
``int8_mm`` (``torch._int_mm`` + epilogue); ``cast_gemm`` (``matmul_small.scaled_dequant``: cast the
8-bit weight to bf16, GEMM, output scale); ``quant_tw`` / ``quant_row`` (the activation quantizers
alone). Each path's output is checked against bf16 (relative error in the JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from hybridquant.ops import act_quant, matmul_fp8, matmul_int8, matmul_small

# (K, N) of Flux.1's linears: attention q/k/v (fused), out proj, MLP up/down, single-block linear1/2.
SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]
MS = [256, 512, 1024, 1536, 4096, 4608]
L2_BYTES = 50 * 2**20


def gpu_and_host(fns, calls: int, rounds: int) -> tuple[float, float]:
    """(median GPU us per call, median host us per call) of calling ``fns`` round-robin."""
    n = len(fns)
    fns[0]()
    torch.cuda.synchronize()
    gpu, host = [], []
    spin = 2_000_000  # GPU cycles (~1 ms); doubled while the host outlasts it
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while len(gpu) < rounds:
        torch.cuda._sleep(spin)
        start.record()
        t0 = time.perf_counter()
        for i in range(calls):
            fns[i % n]()
        t1 = time.perf_counter()
        end.record()
        spin_left = not start.query()  # the spin still runs: every call was queued behind it
        torch.cuda.synchronize()
        if not spin_left:
            spin *= 2
            continue
        gpu.append(start.elapsed_time(end) * 1e3 / calls)
        host.append((t1 - t0) * 1e6 / calls)
    return statistics.median(gpu), statistics.median(host)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--calls", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for k, n in SHAPES:
        copies = max(2, -(-2 * L2_BYTES // (n * k)))  # fp8 bytes: enough copies to exceed L2 twice
        ws = [torch.randn(n, k, device=dev) * 0.02 for _ in range(copies)]
        b = torch.randn(n, device=dev).to(torch.bfloat16) * 0.1
        w16 = [w.to(torch.bfloat16) for w in ws]
        s_tw = [(w.abs().amax() / 448).float() for w in ws]
        q_tw = [(w / s).clamp(-448, 448).to(torch.float8_e4m3fn) for w, s in zip(ws, s_tw, strict=True)]
        ops_tw = [matmul_fp8.gemm_operands(q, s) for q, s in zip(q_tw, s_tw, strict=True)]
        sb_row = [matmul_fp8.row_scale_b(s, n) for s in s_tw]
        s8 = [(w.abs().amax(dim=1, keepdim=True) / 127).float() for w in ws]
        q8 = [(w / s).round().clamp(-127, 127).to(torch.int8) for w, s in zip(ws, s8, strict=True)]
        del ws
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            paths = {
                "bf16": lambda i: F.linear(x, w16[i], b),
                "fp8": lambda i: matmul_fp8.fp8_linear_prepared(x, *ops_tw[i], b),
                "fp8_2k": lambda i: matmul_fp8.fp8_linear_prepared(x, *ops_tw[i], b, impl="triton2"),
                "fp8_row": lambda i: matmul_fp8.fp8_rowwise_linear(x, q_tw[i], sb_row[i], b),
                "fp8_row_tr": lambda i: matmul_fp8.fp8_rowwise_fused(x, q_tw[i], s_tw[i], b),
                "fp8_tr": lambda i: matmul_fp8.fp8_linear_fused(x, q_tw[i], s_tw[i], b),
                "int8": lambda i: matmul_int8.int8_linear_fused(x, q8[i], s8[i], b),
                "int8_mm": lambda i: matmul_int8.int8_linear(x, q8[i], s8[i], b),
                "cast_gemm": lambda i: matmul_small.scaled_dequant(x, q_tw[i], s_tw[i], b),
                "quant_tw": lambda i: matmul_fp8.quantize_activation(x),
                "quant_row": lambda i: act_quant.quantize_rows(x, torch.float8_e4m3fn),
            }
            ref = paths["bf16"](0).float()
            row = {"M": m, "K": k, "N": n}
            for name, fn in paths.items():
                if not name.startswith("quant"):
                    y = fn(0)
                    row[f"{name}_err"] = float((y.float() - ref).norm() / ref.norm())
                fns = [(lambda j: (lambda: fn(j)))(j) for j in range(copies)]
                row[f"{name}_gpu_us"], row[f"{name}_host_us"] = gpu_and_host(fns, args.calls, args.rounds)
            base = row["bf16_gpu_us"]
            ratios = {p: base / row[f"{p}_gpu_us"] for p in paths if p != "bf16" and not p.startswith("quant")}
            row.update({f"{p}_vs_bf16": r for p, r in ratios.items()})
            rows.append(row)
            print(f"M={m:5d} K={k:5d} N={n:5d} bf16 {base:7.1f} us (host {row['bf16_host_us']:5.1f}) | "
                  + " ".join(f"{p} {r:.2f}x" for p, r in ratios.items())
                  + f" | quant tw {row['quant_tw_gpu_us']:.1f} row {row['quant_row_gpu_us']:.1f} us"
                  + " | host " + " ".join(f"{p} {row[f'{p}_host_us']:.0f}" for p in paths), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
