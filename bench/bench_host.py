"""Host (CPU) time to enqueue one quantized Linear call, per format, against a stock ComfyUI Linear.

Why: on the H200 the whole-model eager forward is host-bound (at the time, bench/RESULTS_H200_stop18.md: the pack's Flux
forward took 21-49 ms of CPU time to enqueue against bf16's 11-15 ms, while its GPU-only time was
1.25x faster). This bench isolates the per-call Python + launch cost of one layer, in the same
process, so every change to ``ops/layers.py`` / ``ops/linear_paths.py`` can be measured:

    PYTHONPATH=<dir holding a hybridquant link> python bench/bench_host.py --comfy PATH/TO/ComfyUI \\
        [--device cuda] [--rows 4096] [--formats float8_e4m3fn,mxfp8,...] [--profile FORMAT]

For each format: ``enqueue_us`` = wall time of N back-to-back calls divided by N, measured while
the GPU queue is not full (N is small, and the GPU is synchronised before), so it is the host cost;
``vs_stock`` = that time over a stock ``comfy.ops.disable_weight_init.Linear`` (bf16, same shape).
``--profile FMT`` prints cProfile's top functions for that format's calls (where the host time goes).
``--ops`` also times the pieces an 8-bit layer call is made of (allocations, the quantizer launches,
``torch._scaled_mm``, ``F.linear``), each behind a GPU spin (``torch.cuda._sleep``) so the host never
waits: the host cost of each piece, to see what a layer call spends beyond them.
On the CPU (``--device cpu``, tiny default shape) the kernels are the dequantize fallback, so only the
Python part of the dispatch is comparable; GPU numbers come from the lent GPU only.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

DEFAULT_FORMATS = ("float8_e4m3fn", "float8_e4m3fn_rowwise", "int8_tensorwise+per_row", "mxfp8", "hybrid_mxfp8",
                   "nvfp4", "bnb_nf4")


def _import_comfy(path: str | None, device: str):
    if path:
        sys.path.insert(0, path)
    saved = sys.argv
    sys.argv = [saved[0]] + (["--cpu"] if device == "cpu" else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401
        import comfy.ops  # noqa: F401
    finally:
        sys.argv = saved


def _layer_state(fmt_case: str, w, bias):
    """The state dict the converter writes for one layer named ``l`` in format ``fmt_case``."""
    import torch

    from hybridquant.converter import metadata as qmeta
    from hybridquant.converter.formats import get_codec

    fmt, _, opt = fmt_case.partition("+")
    if fmt.startswith("bnb_"):
        import bitsandbytes.functional as bf

        packed, qs = bf.quantize_4bit(w.to("cuda" if torch.cuda.is_available() else "cpu").contiguous(),
                                      blocksize=64, quant_type=fmt[4:])
        sd = {"l.weight": packed.cpu(), **{f"l.weight.{k}": v.cpu() if hasattr(v, "cpu") else v
                                           for k, v in qs.as_dict(packed=True).items()}}
    else:
        opts = {"per_row": True} if opt == "per_row" else {}
        codec = get_codec(fmt)
        q = codec.quantize(w.float(), **opts)
        meta = {**codec.metadata(**opts), "orig_shape": list(w.shape), "orig_dtype": "bfloat16"}
        sd = {f"l.{s}": t for s, t in q.items()}
        sd["l.comfy_quant"] = qmeta.encode_comfy_quant(meta)
    sd["l.bias"] = bias
    return sd


def build(fmt_case: str, n: int, k: int, device, dtype):
    import comfy.ops
    import torch

    from hybridquant import ops as hq

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    if fmt_case == "stock":
        m = torch.nn.Module()
        m.l = comfy.ops.disable_weight_init.Linear(k, n, bias=True, dtype=dtype)
        m.load_state_dict({"l.weight": w, "l.bias": bias})
        return m.to(device).l
    sd = _layer_state(fmt_case, w, bias)
    cls = hq.choose_ops(sd.keys(), None)
    m = torch.nn.Module()
    m.l = cls.Linear(k, n, bias=True, dtype=dtype)
    m.load_state_dict(hq.prepare_state_dict(sd, None), strict=True)
    return m.to(device).l


def enqueue_us(layer, x, calls: int, rounds: int, sync) -> float:
    """Median over rounds of (wall time of ``calls`` back-to-back forwards) / calls, in microseconds."""
    for _ in range(3):
        layer(x)
    sync()
    times = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            layer(x)
        times.append((time.perf_counter() - t0) / calls * 1e6)
        sync()
    times.sort()
    return times[len(times) // 2]


def op_costs(rows: int, n: int, k: int, calls: int, rounds: int) -> list[tuple[str, float]]:
    """Host microseconds per call of the pieces of an 8-bit layer call on CUDA (``--ops``)."""
    import torch
    import torch.nn.functional as F

    from hybridquant.ops import act_quant, matmul_fp8

    dev = torch.device("cuda")
    x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=dev) * 0.02).to(torch.float8_e4m3fn)
    wb = w.to(torch.bfloat16)
    b = torch.zeros(n, device=dev, dtype=torch.bfloat16)
    w_t, one = w.t(), torch.ones((1,), device=dev)
    xq, sx = act_quant.quantize_rows(x, torch.float8_e4m3fn)
    sb = torch.ones((1, n), device=dev)
    pieces = [
        ("torch.empty fp8 [M, K]", lambda: torch.empty((rows, k), dtype=torch.float8_e4m3fn, device=dev)),
        ("x.reshape(-1, K) (2-D view)", lambda: x.reshape(-1, k)),
        ("F.linear bf16 + bias", lambda: F.linear(x, wb, b)),
        ("_scaled_mm tensorwise + bias", lambda: torch._scaled_mm(xq, w_t, scale_a=one, scale_b=one, bias=b,
                                                                 out_dtype=torch.bfloat16)),
        ("_scaled_mm row-wise + bias", lambda: torch._scaled_mm(xq, w_t, scale_a=sx, scale_b=sb, bias=b,
                                                               out_dtype=torch.bfloat16)),
        ("quantize_rows (per-token, 1 launch)", lambda: act_quant.quantize_rows(x, torch.float8_e4m3fn)),
        ("quantize_activation (tensorwise)", lambda: matmul_fp8.quantize_activation(x)),
        ("fp8_rowwise_prepared (quantizer + GEMM)", lambda: matmul_fp8.fp8_rowwise_prepared(x, w_t, sb, b)),
        ("fp8_linear_prepared (quantizer + GEMM)", lambda: matmul_fp8.fp8_linear_prepared(x, w_t, one, b)),
    ]
    out = []
    for name, f in pieces:
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        times = []
        for _ in range(rounds):
            torch.cuda._sleep(50_000_000)  # the GPU is busy far longer than the calls take to enqueue
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            times.append((time.perf_counter() - t0) / calls * 1e6)
            torch.cuda.synchronize()
        times.sort()
        out.append((name, times[len(times) // 2]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", help="ComfyUI tree (default: already importable)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--rows", type=int, default=None, help="rows of the activation (default 4096 on cuda, 8 on cpu)")
    ap.add_argument("--shape", default=None, help="N,K of the layer (default 3072,3072 on cuda, 64,64 on cpu)")
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    ap.add_argument("--calls", type=int, default=20, help="calls per timed round (keep the GPU queue short)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--profile", default=None, help="print cProfile's top functions for this format")
    ap.add_argument("--ops", action="store_true", help="also time the pieces of an 8-bit layer call (CUDA)")
    a = ap.parse_args(argv)

    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _import_comfy(a.comfy, device)
    cuda = device.startswith("cuda")
    rows = a.rows or (4096 if cuda else 8)
    n, k = (int(v) for v in (a.shape or ("3072,3072" if cuda else "64,64")).split(","))
    dtype = torch.bfloat16
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x = torch.randn(rows, k, device=device, dtype=dtype)
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"layer {n}x{k}, rows {rows}, {a.calls} calls x {a.rounds} rounds")
    stock = enqueue_us(build("stock", n, k, device, dtype), x, a.calls, a.rounds, sync)
    print(f"{'format':28s} {'enqueue_us':>10s} {'vs_stock':>8s} path")
    print(f"{'stock bf16 Linear':28s} {stock:10.1f} {1.0:8.2f}")
    for fmt in [f for f in a.formats.split(",") if f]:
        try:
            layer = build(fmt, n, k, device, dtype)
        except Exception as e:  # a format this install cannot build (e.g. no bitsandbytes)
            print(f"{fmt:28s} skipped: {type(e).__name__}: {e}")
            continue
        us = enqueue_us(layer, x, a.calls, a.rounds, sync)
        print(f"{fmt:28s} {us:10.1f} {us / stock:8.2f} {getattr(layer, 'hq_last_path', '?')}")
        if a.profile == fmt:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(a.calls * 10):
                layer(x)
            prof.disable()
            sync()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            print(s.getvalue())
    if a.ops and cuda:
        print(f"\n{'piece of a layer call':40s} {'host_us':>8s}")
        for name, us in op_costs(rows, n, k, a.calls, min(a.rounds, 10)):
            print(f"{name:40s} {us:8.1f}")


if __name__ == "__main__":
    main()
