"""Timers of the whole-model benchmark (one forward = ``fwd()``; every function returns milliseconds).

Not bench/layer_shim.bench (Triton's do_bench): that needs CUDA and Triton (the CPU ``--tiny`` run has
neither path), flushes L2 between calls (a sampler's steps do not), and times with events only, which
hides the host enqueue time these rows are about.
"""

from __future__ import annotations

import statistics
import time

import torch


def sync(cuda: bool):
    if cuda:
        torch.cuda.synchronize()


def time_eager(fwd, n, warmup, cuda) -> float:
    """Median wall time of ``n`` forwards, each between synchronizations, after ``warmup`` forwards."""
    for _ in range(warmup):
        fwd()
    sync(cuda)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fwd()
        sync(cuda)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def time_graph(fwd, n) -> tuple[float | None, str | None]:
    """Median CUDA-graph replay time of the captured forward (GPU only: no host work), or (None, why)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fwd()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fwd()
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        del g
        return statistics.median(ts), None
    except Exception as e:  # noqa: BLE001 - the reason is the measurement
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


_CYCLES_PER_MS = None


def time_host(fwd, ms_eager, samples=3) -> tuple[float, str | None]:
    """CPU time to enqueue one forward: a GPU spin longer than the forward is queued first, so the GPU never
    makes the host wait; the call is timed without synchronizing. The spin outlasts any enqueue (an eager
    forward's wall time includes its enqueue); if it ended anyway the result is an upper bound (note)."""
    global _CYCLES_PER_MS
    if _CYCLES_PER_MS is None:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)
        a.record()
        torch.cuda._sleep(20_000_000)
        b.record()
        b.synchronize()
        _CYCLES_PER_MS = 20_000_000 / a.elapsed_time(b)
    spin_ms = 1.5 * ms_eager + 20
    ts, note = [], None
    for _ in range(samples):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(spin_ms * _CYCLES_PER_MS))
        spun = torch.cuda.Event()
        spun.record()
        t0 = time.perf_counter()
        fwd()
        ts.append((time.perf_counter() - t0) * 1e3)
        if spun.query():
            note = "GPU spin ended during the call (sync in forward or launch queue full): upper bound"
    torch.cuda.synchronize()
    return statistics.median(ts), note


def transient_bytes(fwd) -> int:
    """Bytes allocated during one forward above what was allocated before it (activations, workspaces)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fwd()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def spread(values) -> tuple[float | None, float | None, float | None]:
    """(median, min, max) of the per-round values that exist."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None, None
    return statistics.median(v), min(v), max(v)


def row_round_cost(first_ms, n, warmup, graph, host_samples, cuda) -> float:
    """Seconds one round of a row costs, estimated from one forward's time: the eager forwards, the CUDA
    graph's warm-up/capture/replays, the host samples (spin + forward each) and the peak forward."""
    units = 1 + warmup + n
    if cuda:
        units += (3 + n) if graph else 0
        units += host_samples * 2.5 + 1
    return units * first_ms / 1e3 + (host_samples * 0.02 if cuda else 0.0)
