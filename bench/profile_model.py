"""Where the host time of one eager whole-model forward goes: cProfile of ComfyUI's Flux forward (the
bench_model.py setup, fewer blocks) for bf16 and for pack formats, in the same process.

    PYTHONPATH=<parent of hybridquant> python bench/profile_model.py --comfy $COMFY \\
        [--formats float8_e4m3fn,bnb_nf4] [--size 512] [--depth 2 4] [--calls 20] [--top 25]

Prints per format: host ms per forward without the profiler (GPU spin first, as bench_model's
host_ms), the garbage collections one forward triggers (per generation, with the time they took) and
the host ms with the collector off, then cProfile's top functions by own time over ``--calls``
forwards. GPU only.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_comfy as mc  # noqa: E402
import model_formats as mf  # noqa: E402
import model_timing as mt  # noqa: E402
import model_zoo as mz  # noqa: E402


def cast_calls(fwd) -> dict:
    """Which modules still go through ComfyUI's cast_bias_weight (not the direct call) in one forward."""
    import collections

    import comfy.ops

    calls, real = collections.Counter(), comfy.ops.cast_bias_weight

    def counting(s, *args, **kw):
        w = getattr(s, "weight", None)
        calls[(type(s).__name__, str(getattr(w, "dtype", None)), str(getattr(args[0], "dtype", None)) if args else "-")] += 1
        return real(s, *args, **kw)

    comfy.ops.cast_bias_weight = counting
    try:
        fwd()
    finally:
        comfy.ops.cast_bias_weight = real
    return dict(calls)


def gc_cost(fwd, calls: int) -> dict:
    """Garbage collections per forward by generation and their total ms per forward (``gc.callbacks``):
    a collection runs inside whatever call allocated the object that crossed the threshold, so in
    cProfile its time shows up as that call's own time."""
    import gc

    counts, spent, t0 = [0, 0, 0], [0.0], [0.0]

    def cb(phase, info):
        if phase == "start":
            t0[0] = time.perf_counter()
        else:
            counts[info["generation"]] += 1
            spent[0] += time.perf_counter() - t0[0]

    gc.callbacks.append(cb)
    try:
        for _ in range(calls):
            fwd()
    finally:
        gc.callbacks.remove(cb)
    return {"gen0": counts[0] / calls, "gen1": counts[1] / calls, "gen2": counts[2] / calls,
            "ms": spent[0] * 1e3 / calls, "tracked_objects": len(gc.get_objects())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--formats", default="float8_e4m3fn,bnb_nf4")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--depth", type=int, nargs=2, default=(2, 4), metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    mc.import_comfy(a.comfy, cpu=False)
    from safetensors.torch import save_file

    from hybridquant.converter import PlanOptions, convert_file

    dev = torch.device("cuda")
    case = mz.ModelCase("flux", dict(mz.FLUX, depth=a.depth[0], depth_single_blocks=a.depth[1]))
    work = Path(tempfile.mkdtemp(prefix="hq_profile_"))
    src = work / "bf16.safetensors"
    save_file(mz.seeded_state_dict(case, dev), str(src))
    x, sigma, kw, tokens = mz.inputs(case, a.size, dev, 512)
    for fmt in ["bf16"] + [f for f in a.formats.split(",") if f]:
        path = src
        if fmt != "bf16":
            path = work / f"{fmt}.safetensors"
            convert_file(str(src), str(path), PlanOptions(presets=(mz.PRESET["flux"],), **mf.plan_fields(fmt, "flux")),
                         device="cuda", overwrite=True, error_stats=False)
        patcher = mc.load(str(path), stock=fmt == "bf16")
        model = patcher.model

        def fwd():
            with torch.inference_mode():
                return model.apply_model(x, sigma, **kw)

        for _ in range(3):
            fwd()
        torch.cuda.synchronize()
        ms = mt.time_eager(fwd, 10, 2, True)
        host, note = mt.time_host(fwd, ms)
        gcs = gc_cost(fwd, a.calls)
        import gc
        gc.disable()
        try:
            host_nogc, _ = mt.time_host(fwd, ms)
        finally:
            gc.enable()
        prof = cProfile.Profile()
        torch.cuda.synchronize()
        prof.enable()
        for _ in range(a.calls):
            fwd()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(a.top)
        print(f"=== {fmt}: {tokens} tokens, eager {ms:.2f} ms, host {host:.2f} ms{' (' + note + ')' if note else ''}, "
              f"host with the collector off {host_nogc:.2f} ms")
        print(f"garbage collections per forward: {gcs}")
        print(f"cast_bias_weight calls in one forward (module class, weight dtype, input dtype): {cast_calls(fwd)}")
        print("\n".join(s.getvalue().splitlines()[:a.top + 12]))
        patcher = model = None
        mc.unload()


if __name__ == "__main__":
    main()
