"""Benchmark: our streaming converter vs the peer convert-to-quant==1.3.4, same input, same run.

Generates a synthetic checkpoint with Flux.1 layer names and shapes (hidden size 3072: double blocks with
qkv 9216x3072, mlp 12288x3072 / 3072x12288, modulation 18432x3072; single blocks with linear1
21504x3072, linear2 3072x15360), bf16, Gaussian weights of std 0.02 plus ~1e-4 of the entries as outliers
of 10-60x the std (real checkpoints have such heavy tails; they set the tensorwise scale). Then runs both
CLIs on CPU in FP8 tensorwise round-to-nearest (ours: ``--simple``; peer: ``--simple --comfy_quant``) and
prints wall time and peak RSS of each (from ``/usr/bin/time -v``) and the ratios. The input is read once
before each run so both start with it in the page cache.

    bash bench/peer_env.sh                     # once: the peer in .cache/peer-venv
    .venv/bin/python bench/bench_convert.py    # ~0.96 GB checkpoint, both converters
    .venv/bin/python bench/bench_convert.py --double 7 --single 5 --skip-peer   # ~6.2 GB, ours only

Default size: 1 double + 1 single block (~0.96 GB). Timings on a shared machine are noisy: the script
prints the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
H = 3072


def importable_path(work: Path) -> Path:
    """A folder with ``hybridquant`` -> this checkout, for interpreters without the editable install."""
    pypath = work / "pypath"
    pypath.mkdir(parents=True, exist_ok=True)
    if not (pypath / "hybridquant").exists():
        (pypath / "hybridquant").symlink_to(REPO)
    try:
        import hybridquant  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(pypath))
    return pypath


def flux_layers(n_double: int, n_single: int) -> list[tuple[str, tuple[int, ...]]]:
    t: list[tuple[str, tuple[int, ...]]] = [
        ("img_in.weight", (H, 64)), ("img_in.bias", (H,)),
        ("txt_in.weight", (H, 4096)), ("txt_in.bias", (H,)),
        ("time_in.in_layer.weight", (H, 256)), ("time_in.out_layer.weight", (H, H)),
        ("vector_in.in_layer.weight", (H, 768)), ("vector_in.out_layer.weight", (H, H)),
        ("guidance_in.in_layer.weight", (H, 256)), ("guidance_in.out_layer.weight", (H, H)),
    ]
    for i in range(n_double):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            t += [(f"{b}_mod.lin.weight", (6 * H, H)), (f"{b}_mod.lin.bias", (6 * H,)),
                  (f"{b}_attn.qkv.weight", (3 * H, H)), (f"{b}_attn.qkv.bias", (3 * H,)),
                  (f"{b}_attn.norm.query_norm.scale", (128,)), (f"{b}_attn.norm.key_norm.scale", (128,)),
                  (f"{b}_attn.proj.weight", (H, H)), (f"{b}_attn.proj.bias", (H,)),
                  (f"{b}_mlp.0.weight", (4 * H, H)), (f"{b}_mlp.0.bias", (4 * H,)),
                  (f"{b}_mlp.2.weight", (H, 4 * H)), (f"{b}_mlp.2.bias", (H,))]
    for i in range(n_single):
        b = f"single_blocks.{i}"
        t += [(f"{b}.linear1.weight", (7 * H, H)), (f"{b}.linear1.bias", (7 * H,)),
              (f"{b}.linear2.weight", (H, 5 * H)), (f"{b}.linear2.bias", (H,)),
              (f"{b}.modulation.lin.weight", (3 * H, H)), (f"{b}.norm.query_norm.scale", (128,))]
    t += [("final_layer.adaLN_modulation.1.weight", (2 * H, H)), ("final_layer.linear.weight", (64, H)),
          ("final_layer.linear.bias", (64,))]
    return t


def make_checkpoint(path: Path, n_double: int, n_single: int, seed: int = 0) -> int:
    """Write the synthetic checkpoint tensor by tensor (never the whole model in memory)."""
    from hybridquant.converter.formats.base import TensorSpec
    from hybridquant.converter.safetensors_writer import AtomicSafetensorsWriter

    layers = flux_layers(n_double, n_single)
    specs = {n: TensorSpec(torch.bfloat16, s) for n, s in layers}
    g = torch.Generator().manual_seed(seed)
    with AtomicSafetensorsWriter(path, specs, {"modelspec.title": "synthetic flux-like"}, overwrite=True) as w:
        for name, shape in layers:
            x = torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02)
            if len(shape) == 2:
                n_out = max(1, x.numel() // 10000)
                idx = torch.randint(0, x.numel(), (n_out,), generator=g)
                mag = torch.empty(n_out).uniform_(10, 60, generator=g) * 0.02
                sign = torch.randint(0, 2, (n_out,), generator=g).float().mul_(2).sub_(1)
                x.view(-1)[idx] = mag * sign
            w.write(name, x.to(torch.bfloat16))
            del x
    return path.stat().st_size


def _warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def timed(cmd: list[str], env=None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; wall seconds and peak RSS (bytes) of the process tree's max."""
    tv = shutil.which("time") or "/usr/bin/time"
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.monotonic()
        proc = subprocess.run([tv, "-v", "-o", tf.name, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
        wall = time.monotonic() - t0
        info = tf.read()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", info).group(1)) * 1024
    el = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", info).group(1)
    parts = [float(p) for p in el.split(":")]
    secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return {"wall_s": secs, "outer_wall_s": wall, "peak_rss": rss, "stdout": proc.stdout, "stderr": proc.stderr}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=1, help="number of Flux double blocks (679 MB each)")
    ap.add_argument("--single", type=int, default=1, help="number of Flux single blocks (283 MB each)")
    ap.add_argument("--workdir", default=str(REPO / ".cache" / "bench"), help="where the checkpoints go")
    ap.add_argument("--skip-peer", action="store_true", help="only run our converter")
    ap.add_argument("--peer", default=str(REPO / ".cache" / "peer-venv" / "bin" / "convert_to_quant"))
    ap.add_argument("--ours", default=str(REPO / ".venv" / "bin" / "convert_to_quant"))
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--extra", default="", help="extra flags for our CLI (e.g. '--no-error-stats')")
    ap.add_argument("--peer-python", help="run the peer as `PYTHON -c 'convert_to_quant main'` instead of --peer "
                                          "(e.g. the same interpreter and torch as ours)")
    ap.add_argument("--peer-path", help="PYTHONPATH for --peer-python (a folder holding convert_to_quant, tqdm, prodigyplus)")
    ap.add_argument("--ours-python", help="run ours as `PYTHON -m hybridquant.converter` (hybridquant importable "
                                          "via a symlink this script creates) instead of --ours")
    ap.add_argument("--threads", type=int, help="OMP/MKL threads for both converters (default: torch's choice)")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pypath = importable_path(work)
    src = work / f"flux_like_d{a.double}_s{a.single}.safetensors"
    print(f"load average before: {os.getloadavg()}  cpus: {os.cpu_count()}  usable by this process: "
          f"{len(os.sched_getaffinity(0))}  threads: {a.threads or 'default'}")
    if not src.exists():
        t0 = time.monotonic()
        size = make_checkpoint(src, a.double, a.single)
        print(f"generated {src} ({size / 1e9:.2f} GB bf16) in {time.monotonic() - t0:.1f}s")
    size = src.stat().st_size
    print(f"input: {src} {size / 1e9:.3f} GB")
    results = {}
    env = dict(os.environ)
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    ours_cmd = [a.ours] if not a.ours_python else [a.ours_python, "-m", "hybridquant.converter"]
    ours_env = dict(env, PYTHONPATH=str(pypath)) if a.ours_python else env
    ours_out = work / "ours_fp8.safetensors"
    ours_args = ["-i", str(src), "-o", str(ours_out), "--simple", "--comfy_quant", "--device", "cpu", "--overwrite",
                 "-q", *a.extra.split()]
    _warm(src)
    results["ours"] = timed([*ours_cmd, *ours_args], env=ours_env)
    print("ours  :", results["ours"]["stdout"].strip().replace("\n", "\n        "))
    # the peer computes no error statistics; ours does by default (one dequantization per layer)
    _warm(src)
    results["ours_nostats"] = timed([*ours_cmd, *ours_args, "--no-error-stats"], env=ours_env)
    peer_py = Path(a.peer).parent / "python"
    if not a.skip_peer and not a.peer_python and peer_py.exists():
        # Our converter once more, run by the peer venv's interpreter: the SAME torch build (CPU wheel) as
        # the peer, so the RSS comparison is not skewed by torch's import size (the project's .venv has a
        # CUDA build whose import alone is ~600 MB RSS on this machine, ~220 MB for the CPU wheel).
        _warm(src)
        results["ours_same_torch"] = timed([str(peer_py), "-m", "hybridquant.converter", *ours_args],
                                           env=dict(env, PYTHONPATH=str(pypath)))
    if not a.skip_peer:
        if a.peer_python:
            peer_cmd = [a.peer_python, "-c", "import sys; from convert_to_quant.convert_to_quant import main; "
                        "sys.argv[0] = 'convert_to_quant'; sys.exit(main())"]
            peer_env = dict(env, PYTHONPATH=a.peer_path or "")
        else:
            if not Path(a.peer).exists():
                raise SystemExit(f"peer converter not found at {a.peer}: run bash bench/peer_env.sh")
            peer_cmd, peer_env = [a.peer], env
        peer_out = work / "peer_fp8.safetensors"
        if peer_out.exists():
            peer_out.unlink()
        _warm(src)
        results["peer"] = timed([*peer_cmd, "-i", str(src), "-o", str(peer_out), "--simple", "--comfy_quant",
                                 "--device", "cpu"], env=peer_env)
        _compare(ours_out, peer_out)
    print()
    print(f"{'converter':<28}{'wall s':>10}{'peak RSS MB':>14}   (torch {torch.__version__} in .venv)")
    labels = {"ours": "ours (default)", "ours_nostats": "ours --no-error-stats",
              "ours_same_torch": "ours, peer's torch build",
              "peer": "peer convert-to-quant 1.3.4"}
    for k, r in results.items():
        print(f"{labels[k]:<28}{r['wall_s']:>10.2f}{r['peak_rss'] / 1e6:>14.0f}")
    # Both CLIs start by importing torch: a fixed cost (seconds with some torch builds) that no converter
    # can avoid; shown separately so the conversion work itself can be compared too.
    startup = {"ours": timed([a.ours_python or str(Path(a.ours).parent / "python"), "-c", "import torch"],
                             env=ours_env)["wall_s"]}
    if "peer" in results:
        startup["peer"] = timed([a.peer_python or str(Path(a.peer).parent / "python"), "-c", "import torch"],
                                env=peer_env)["wall_s"]
    if startup:
        print("interpreter + `import torch` alone: " + ", ".join(f"{k} {v:.2f} s" for k, v in startup.items()))
    if "peer" in results:
        p = results["peer"]
        for k in ("ours", "ours_nostats", "ours_same_torch"):
            if k in results:
                o = results[k]
                print(f"{labels[k]:<28} speed-up (peer wall / ours wall): {p['wall_s'] / o['wall_s']:5.1f}x   "
                      f"RSS ratio (peer / ours): {p['peak_rss'] / o['peak_rss']:4.1f}x")
                if k != "ours_same_torch" and "ours" in startup and "peer" in startup:
                    po, oo = p["wall_s"] - startup["peer"], o["wall_s"] - startup["ours"]
                    print(f"{'':<28} excluding start-up: {po:.2f} s / {oo:.2f} s = {po / oo:5.1f}x")
    print(f"ours: {size / 1e6 / results['ours']['wall_s']:.0f} MB/s of input, peak RSS {results['ours']['peak_rss'] / 1e9:.2f} GB "
          f"for a {size / 1e9:.2f} GB input")
    print(f"load average after: {os.getloadavg()}")
    if not a.keep:
        for f in (ours_out, work / "peer_fp8.safetensors"):
            if f.exists():
                f.unlink()
    return 0


def _compare(ours: Path, peer: Path) -> None:
    """Sanity: both files hold the same FP8 layers with the same scales (same RTN math)."""
    from safetensors import safe_open

    with safe_open(str(ours), "pt") as a, safe_open(str(peer), "pt") as b:
        scales = [k for k in a.keys() if k.endswith(".weight_scale")]
        common = [k for k in scales if k in b.keys()]
        worst = 0.0
        for k in common:
            sa, sb = a.get_tensor(k).float(), b.get_tensor(k).float()
            worst = max(worst, float((sa - sb).abs().max() / sa.abs().max()))
        print(f"check: {len(common)}/{len(scales)} of our weight_scale tensors also in the peer's file; "
              f"max relative scale difference {worst:.2e}")


if __name__ == "__main__":
    sys.exit(main())
