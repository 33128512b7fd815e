"""Per-layer time of the 4-bit and 5/6-bit Triton paths (ops/dequant4.py, ops/dequant_int.py) against bf16
``F.linear`` and against NF4, same run.

    python bench/bench_dequant4.py [--json FILE] [--formats nvfp4,nf4,int5,int6] [--no-gemv]

Needs a CUDA GPU (SM 8.9+), Triton; bitsandbytes for the matmul_4bit baseline. For M in
{1, 4, 16, 256, 1024, 4096} and Flux (K, N) it times (triton.testing.do_bench medians, ms):
``bf16`` F.linear; for NF4 (bitsandbytes, blocksize 64, nested) and NVFP4: ``layer`` =
``linear_paths.run`` (the layer's own dispatch; the path it took is recorded), ``gemv`` (fused
kernel, any M), ``dq+mm`` (one-launch dequantize to bf16 + F.linear), ``old`` (codec dequantize +
F.linear: the path before dq4) and for NF4 ``bnb`` (bitsandbytes matmul_4bit). For INT5 / INT6
(group 32): ``layer``, ``dq+mm`` (ops/dequant_int.py) and ``old`` (the codec's torch dequantize +
F.linear: the path before dq_int, and what devices without the kernel run), plus ``vs nf4`` = NF4's
``layer`` time / this format's ``layer`` time (>= 1: no slower than NF4). Ratio = t_bf16 / t
(> 1 faster than bf16). Errors: relative Frobenius vs x @ dequant(W).T in float32.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from layer_shim import LayerShim as Shim
from layer_shim import bench

from hybridquant.converter.formats import get_codec
from hybridquant.converter.formats.bnb4bit import read_quant_state
from hybridquant.ops import dequant4, dequant_int, linear_paths

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]  # (K, N)
MS = [1, 4, 16, 256, 1024, 4096]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--formats", default="nvfp4,nf4,int5,int6", help="comma-separated subset to time")
    ap.add_argument("--no-gemv", action="store_true", help="skip the 4-bit GEMV rows (off by default in the ops; slow at large M)")
    args = ap.parse_args()
    want = set(args.formats.split(","))
    dev = torch.device("cuda")
    torch.manual_seed(0)
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001
        bnb = None
        print(f"bitsandbytes unavailable: {e}")
    rows = []
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for K, N in SHAPES:
        w = torch.randn(N, K, device=dev) * 0.02
        w16 = w.to(torch.bfloat16)
        layers = {}
        q = get_codec("nvfp4").quantize(w)
        layers["nvfp4"] = (Shim("nvfp4", N, K), q)
        qb = get_codec("bnb_nf4").quantize(w, blocksize=64, double_quant=True)
        layers["nf4"] = (Shim("bnb_nf4", N, K, bnb=read_quant_state("b", qb), opts={"blocksize": 64}), qb)
        for bits in (5, 6):
            qi = get_codec(f"int{bits}_groupwise").quantize(w, group_size=32)
            layers[f"int{bits}"] = (Shim(f"int{bits}_groupwise", N, K, opts={"group_size": 32}), qi)
        layers = {k: v for k, v in layers.items() if k in want}
        refs = {k: s.hq_dequantize(t, torch.float32) for k, (s, t) in layers.items()}
        for M in MS:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            r = {"M": M, "K": K, "N": N, "bf16": bench(lambda: F.linear(x, w16))}
            for key, (shim, t) in layers.items():
                y = linear_paths.run(shim, x, t, None, [])
                r[f"{key} path"] = shim.hq_last_path
                r[f"{key} err"] = float((y.float() - x.float() @ refs[key].t()).norm() / (x.float() @ refs[key].t()).norm())
                r[f"{key} layer"] = bench(lambda shim=shim, t=t: linear_paths.run(shim, x, t, None, []))
                kernels = dequant_int if key.startswith("int") else dequant4
                if kernels is dequant4 and not args.no_gemv:
                    r[f"{key} gemv"] = bench(lambda shim=shim, t=t: dequant4.gemv(shim, x, t, None))
                r[f"{key} dq+mm"] = bench(lambda shim=shim, t=t, k=kernels: k.dequant_linear(shim, x, t, None))
                r[f"{key} old"] = bench(lambda shim=shim, t=t: F.linear(x, shim.hq_dequantize(t, x.dtype)))
            if bnb is not None and "nf4" in layers:
                shim, t = layers["nf4"]
                r["nf4 bnb"] = bench(lambda: linear_paths._bnb_linear(shim, x, t, None))
            for k in list(r):
                if isinstance(r[k], float) and k != "bf16" and not k.endswith("err"):
                    r[k + " ratio"] = r["bf16"] / r[k]
            for bits in (5, 6):
                if "nf4" in layers and f"int{bits}" in layers:
                    r[f"int{bits} vs nf4"] = r["nf4 layer"] / r[f"int{bits} layer"]
            rows.append(r)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
