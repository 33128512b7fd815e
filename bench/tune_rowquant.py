"""GPU time of the per-token activation quantizer (``ops/act_quant.py``) per warp count, to set its
``_launch_shape`` rule on this GPU.

    PYTHONPATH=<dir holding a hybridquant link> python bench/tune_rowquant.py [--json F]

For each activation shape (M tokens x K columns: Flux 3072, Wan 5120, the MLP down projections' 12288 /
15360) and each num_warps, the GPU time per call (bench_layers.gpu_and_host: calls queued
behind a GPU spin, inputs rotating over copies larger than L2, as for an activation that comes from
DRAM) and the effective bandwidth (bf16 read + e4m3 codes + scales written). The current rule is
printed first per shape, so every line is also a ratio against it, measured in the same process.
(A run at 0ebde5e+ also tried programs of 2-8 rows: 1.1-2.3x slower than one row per program at every
shape; that form was dropped.)
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_layers import L2_BYTES, gpu_and_host

from hybridquant.ops import act_quant

SHAPES = [(m, k) for k in (3072, 5120, 12288, 15360) for m in (512, 1024, 4096, 4608)]
WARPS = (4, 8, 16)


def timed(m, k, warps, calls, rounds):
    saved = act_quant.WARPS
    act_quant._shapes.clear()
    act_quant.WARPS = warps
    try:
        copies = max(2, 2 * L2_BYTES // (m * k * 2) + 1)
        xs = [torch.randn(m, k, device="cuda").to(torch.bfloat16) for _ in range(copies)]
        fns = [lambda x=x: act_quant.quantize_rows_triton(x, torch.float8_e4m3fn) for x in xs]
        gpu, _ = gpu_and_host(fns, calls, rounds)
        return gpu, act_quant._launch_shape(k)
    finally:
        act_quant.WARPS = saved
        act_quant._shapes.clear()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for m, k in SHAPES:
        base, shape = timed(m, k, act_quant.WARPS, a.calls, a.rounds)
        nbytes = m * k * 3 + m * 4
        print(f"M={m:5d} K={k:5d} rule {shape}: {base:7.1f} us {nbytes / base / 1e6:5.2f} TB/s")
        rows.append({"m": m, "k": k, "warps": "rule", "launch": shape, "gpu_us": base})
        for warps in WARPS:
            us, shape = timed(m, k, warps, a.calls, a.rounds)
            rows.append({"m": m, "k": k, "warps": warps, "launch": shape, "gpu_us": us})
            print(f"   warps {warps:2d} {shape}: {us:7.1f} us  {base / us:5.2f}x rule  {nbytes / us / 1e6:5.2f} TB/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
