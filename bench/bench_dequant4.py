"""Per-layer time of the 4-bit Triton paths (ops/dequant4.py) against bf16 ``F.linear``, same run.

    python bench/bench_dequant4.py [--json FILE]

Needs a CUDA GPU (SM 8.9+), Triton; bitsandbytes for the matmul_4bit baseline. For M in
{1, 4, 16, 256, 1024, 4096} and Flux (K, N) it times (triton.testing.do_bench medians, ms):
``bf16`` F.linear; for NF4 (bitsandbytes, blocksize 64, nested) and NVFP4: ``layer`` =
``linear_paths.run`` (the layer's own dispatch; the path it took is recorded), ``gemv`` (fused
kernel, any M), ``dq+mm`` (one-launch dequantize to bf16 + F.linear), ``old`` (codec dequantize +
F.linear: the path before dq4) and for NF4 ``bnb`` (bitsandbytes matmul_4bit). Ratio = t_bf16 / t
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
from hybridquant.ops import dequant4, linear_paths

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]  # (K, N)
MS = [1, 4, 16, 256, 1024, 4096]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
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
        refs = {k: s.hq_dequantize(t, torch.float32) for k, (s, t) in layers.items()}
        for M in MS:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            r = {"M": M, "K": K, "N": N, "bf16": bench(lambda: F.linear(x, w16))}
            for key, (shim, t) in layers.items():
                y = linear_paths.run(shim, x, t, None, [])
                r[f"{key} path"] = shim.hq_last_path
                r[f"{key} err"] = float((y.float() - x.float() @ refs[key].t()).norm() / (x.float() @ refs[key].t()).norm())
                r[f"{key} layer"] = bench(lambda shim=shim, t=t: linear_paths.run(shim, x, t, None, []))
                r[f"{key} gemv"] = bench(lambda shim=shim, t=t: dequant4.gemv(shim, x, t, None))
                r[f"{key} dq+mm"] = bench(lambda shim=shim, t=t: dequant4.dequant_linear(shim, x, t, None))
                r[f"{key} old"] = bench(lambda shim=shim, t=t: F.linear(x, shim.hq_dequantize(t, x.dtype)))
            if bnb is not None:
                shim, t = layers["nf4"]
                r["nf4 bnb"] = bench(lambda: linear_paths._bnb_linear(shim, x, t, None))
            for k in list(r):
                if isinstance(r[k], float) and k != "bf16" and not k.endswith("err"):
                    r[k + " ratio"] = r["bf16"] / r[k]
            rows.append(r)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
