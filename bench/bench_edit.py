"""Throughput of ``--edit-quant`` and ``--make-hybrid-mxfp8`` against a plain kernel file copy.

Both tools rewrite a whole file where almost every byte is copied unchanged, so the honest baseline is
the fastest possible copy of the same file on the same disk: ``os.copy_file_range`` into a
preallocated file plus ``fsync`` (what the atomic writer also does), measured in the same process run.
Ratios near 1 mean the tools are disk-bound; the peer tool loads the whole file into memory instead.

Usage: ``.venv/bin/python bench/bench_edit.py [--gb 0.5] [--repeats 3] [--dir DIR]``
Generates a synthetic MXFP8 checkpoint (random valid e4m3 codes and E8M0 scales; the content does not
affect copying speed) of about ``--gb`` GB in ``--dir`` (default: a temp dir), prints medians and
ratios, deletes everything it wrote. Peak RSS is printed for the measuring process (torch import
included; the file is generated in a child process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

from hybridquant.converter.edit import edit_quant
from hybridquant.converter.formats.blocked_layout import blocked_shape
from hybridquant.converter.hybridize import make_hybrid_mxfp8


def make_mxfp8_file(path: str, gb: float) -> int:
    m, n = 3072, 8192  # 24 MiB of e4m3 per layer: a realistic DiT linear
    layers = max(1, round(gb * 1e9 / (m * n)))
    g = torch.Generator().manual_seed(0)
    tensors, meta_layers = {}, {}
    for i in range(layers):
        L = f"blocks.{i}.mlp.fc1"
        tensors[f"{L}.weight"] = torch.randint(0, 126, (m, n), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
        tensors[f"{L}.weight_scale"] = torch.randint(100, 130, blocked_shape(m, n // 32), dtype=torch.uint8, generator=g)
        tensors[f"{L}.bias"] = torch.zeros(m, dtype=torch.bfloat16)
        tensors[f"{L}.comfy_quant"] = torch.tensor(list(b'{"format":"mxfp8"}'), dtype=torch.uint8)
        meta_layers[L] = {"format": "mxfp8"}
    save_file(tensors, path, metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": meta_layers})})
    return layers


def kernel_copy(src: str, dst: str) -> None:
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = os.fstat(fi).st_size
        os.posix_fallocate(fo, 0, size)
        off = 0
        while off < size:
            off += os.copy_file_range(fi, fo, size - off, off, off)
        os.fsync(fo)
    finally:
        os.close(fi)
        os.close(fo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--generate", metavar="PATH", help=argparse.SUPPRESS)  # internal: child process
    a = ap.parse_args()
    if a.generate:
        print(make_mxfp8_file(a.generate, a.gb))
        return
    d = tempfile.mkdtemp(prefix="bench_edit_", dir=a.dir)
    try:
        src = os.path.join(d, "mxfp8.safetensors")
        # Generated in a child process so this process's peak RSS is the tools' own.
        layers = int(subprocess.run([sys.executable, __file__, "--gb", str(a.gb), "--generate", src],
                                    check=True, capture_output=True, text=True).stdout)
        size = os.path.getsize(src)
        out = os.path.join(d, "out.safetensors")
        runs = {
            "kernel copy (baseline)": lambda: kernel_copy(src, out),
            "--edit-quant --add-keys": lambda: edit_quant(src, out, add_keys="full_precision_matrix_mult=true", overwrite=True),
            "--make-hybrid-mxfp8": lambda: make_hybrid_mxfp8(src, out, overwrite=True),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(a.repeats):  # interleaved, so load changes on a shared machine hit every variant
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                os.unlink(out)
        base = statistics.median(times["kernel copy (baseline)"])
        print(f"file: {size / 1e9:.2f} GB, {layers} MXFP8 layers; median of {a.repeats} runs")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:26s} {med:6.2f} s  {size / med / 1e6:7.0f} MB/s  {med / base:5.2f}x the kernel copy"
                  f"  (runs: {', '.join(f'{t:.2f}' for t in ts)})")
        print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
