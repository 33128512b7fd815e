"""The pack's models under ComfyUI's dynamic VRAM (comfy-aimdo) on a current core, with a VRAM cap.

    python bench/bench_dynamic_vram.py --comfy $COMFY [--cap-gb 2.5] [--depth 8 16] [--size 1024] \
        [--steps 4] [--warmup 2] [--formats float8_e4m3fn,bnb_nf4] [--stock] [--lora [--no-plain]] [--json out.json]
    python bench/bench_dynamic_vram.py --comfy $COMFY --smoke-cpu     # CPU run of the code path (no aimdo)

Model: ComfyUI's own Flux class at Flux.1 widths (hidden 3072), ``--depth`` double/single blocks, seeded
bf16 weights under real key names, converted by the pack per format (bench_model.py's helpers), larger
than the cap (the script says so when it is not).

Cap: ComfyUI's own ``--reserve-vram`` = device total - ``--cap-gb``. On a dynamic-VRAM core that one flag
sets both what the classic patcher plans with (``model_management.EXTRA_RESERVED_VRAM``) and comfy-aimdo's
headroom (main.py hands it to ``comfy_aimdo.control.init(simple_vram_headroom=...)``), so the dynamic and
classic rows run under the same budget. Not ``torch.cuda.set_per_process_memory_fraction``: that limits
only PyTorch's caching allocator, while aimdo maps the weights' VRAM itself (its VBAR) and ComfyUI's
free-memory queries read the device, so the fraction would cap neither. The cap is checked, not
assumed: ``peak_used_gb`` is the device's memory in use (total - free, ``cudaMemGetInfo`` polled every
2 ms by a thread during load and steps: CUDA context, aimdo and torch together, so it includes what
is not ours).

Start-up is main.py's, minus the server: aimdo ``init`` before torch is imported, ``init_devices``,
``CoreModelPatcher = ModelPatcherDynamic``, ``memory_management.aimdo_enabled = True``.

Rows per format, same converted file, same process:
- ``dynamic``: the pack's loader (``nodes.backend.load_diffusion_model``, no ``disable_dynamic``) ->
  ModelPatcherDynamic; ``classic``: the same loader with ``disable_dynamic=True`` -> ComfyUI's classic
  ModelPatcher, partially loaded (its low-VRAM mode) under the same cap: the baseline of ``ratio``.
- ``--stock``: the float8_e4m3fn file through ComfyUI's own loader (its QuantizedTensor) under dynamic
  VRAM, for reference. ``--lora``: rank-``--lora-rank`` LoRA on the attention/linear projections.
Each: ``load_models_gpu([patcher])`` as the sampler does, then ``--steps`` timed ``BaseModel.apply_model``
calls (one sampling step each) after ``--warmup``.
Columns: ``step_ms`` (median), ``ratio`` = classic step_ms / step_ms; ``peak_used_gb`` vs ``cap_gb``
(``under_cap``); ``base_used_gb`` (in use before the load); ``peak_torch_gb``
(``torch.cuda.max_memory_allocated``: torch's allocator only); ``weights_gb`` (file) and ``model_size_gb`` (``patcher.model_size()``, what ComfyUI books); ``vbar_gb`` /
``resident_gb`` (``ops.dynamic_vram.accounting``: bytes behind aimdo allocations / force-loaded codec
tensors); ``loaded_gb`` (``patcher.loaded_size()`` after the steps); ``rel_err`` of the output vs the
classic row (same math: a difference is kernel non-determinism, or a bug).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFY") or os.environ.get("HYBRIDQUANT_COMFYUI"),
                    help="ComfyUI tree with dynamic VRAM (0.33); default $COMFY")
    ap.add_argument("--cap-gb", type=float, default=2.5, help="device memory the process may use (GiB)")
    ap.add_argument("--depth", nargs=2, type=int, default=(8, 16), metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--formats", default="float8_e4m3fn,bnb_nf4")
    ap.add_argument("--stock", action="store_true", help="add stock ComfyUI FP8 (QuantizedTensor) under dynamic VRAM")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--no-plain", action="store_true", help="with --lora: only the LoRA rows (split runs)")
    ap.add_argument("--work-dir", default=str(REPO / ".cache" / "bench_dynamic_vram"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny widths on CPU: the code path without aimdo")
    a = ap.parse_args(argv)
    if not a.comfy or not (Path(a.comfy) / "comfy" / "ops.py").is_file():
        ap.error(f"--comfy: no ComfyUI tree at {a.comfy!r}")
    return a


def gpu_total_bytes() -> int:
    """Device 0's memory from nvidia-smi: the cap must be known before torch (and aimdo) start."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise SystemExit("nvidia-smi not found: cannot size --reserve-vram before CUDA starts")
    idx = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", idx],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return int(float(out.strip().splitlines()[0]) * 1024 ** 2)


def start_comfy(a):
    """ComfyUI's arguments and main.py's dynamic-VRAM start-up. Returns (comfyui version, reserve bytes)."""
    sys.path.insert(0, str(Path(a.comfy).resolve()))
    reserve = 0
    argv = ["--cpu"] if a.smoke_cpu else []
    if not a.smoke_cpu:
        reserve = gpu_total_bytes() - int(a.cap_gb * GIB)
        if reserve <= 0:
            raise SystemExit(f"--cap-gb {a.cap_gb}: not below this GPU's memory")
        argv = ["--reserve-vram", f"{reserve / GIB:.4f}"]
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        from comfy.cli_args import args, enables_dynamic_vram

        if not a.smoke_cpu:
            if not enables_dynamic_vram():
                raise SystemExit("this core's arguments disable dynamic VRAM")
            import comfy_aimdo.control  # before torch, as main.py does

            headroom = None if args.reserve_vram is None else int(args.reserve_vram * GIB)
            try:
                comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
            except TypeError:  # older aimdo protocol (main.py's fallback)
                comfy_aimdo.control.init(simple_vram_headroom=headroom)
        import comfy.memory_management
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.sd  # noqa: F401

        if not a.smoke_cpu:
            if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
                raise SystemExit(f"{a.comfy}: this core has no dynamic VRAM (ModelPatcherDynamic)")
            devices = mm.get_all_torch_devices()
            try:
                ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * GIB)) for d in devices)
            except TypeError:
                ok = comfy_aimdo.control.init_devices(d.index for d in devices)
            if not ok:
                raise SystemExit("comfy-aimdo did not initialise on this GPU: no dynamic VRAM")
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
    finally:
        sys.argv = saved
    import comfyui_version

    return comfyui_version.__version__, reserve


def import_pack():
    try:
        import hybridquant  # noqa: F401
    except ImportError:  # the repo checked out under another name: a pyroot with a link named hybridquant
        root = REPO / ".cache" / "pyroot"
        root.mkdir(parents=True, exist_ok=True)
        link = root / "hybridquant"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        sys.path.insert(0, str(root))
        import hybridquant  # noqa: F401
    sys.path.insert(0, str(REPO / "bench"))


class Peak:
    """Device memory in use (total - free) polled by a thread: aimdo's VRAM is not torch's to report."""

    def __init__(self, dev, period_s=0.002):
        self.dev, self.period, self.peak, self.base, self._stop = dev, period_s, 0, 0, threading.Event()
        self._t = None

    def __enter__(self):
        import torch

        if self.dev.type != "cuda":
            return self
        self.base = self.peak = self.used()  # before the load: CUDA context + what earlier rows left
        torch.cuda.reset_peak_memory_stats(self.dev)

        def run():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.used())
                time.sleep(self.period)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.dev)
        return total - free

    def __exit__(self, *exc):
        if self._t is not None:
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, self.used())


def main(argv=None):
    a = parse_args(argv)
    version, reserve = start_comfy(a)
    import_pack()
    import statistics

    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import torch
    from model_comfy import layer_paths
    from model_formats import plan_fields
    from model_report import commit
    from model_zoo import FLUX, FLUX_TINY, PRESET, ModelCase, inputs, layer_shapes, lora_state_dict, seeded_state_dict

    from hybridquant.converter import PlanOptions, convert_file
    from hybridquant.nodes import backend
    from hybridquant.ops import dynamic_vram
    from hybridquant.ops.capabilities import core_dynamic_vram

    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    params = dict(FLUX_TINY, depth=1, depth_single_blocks=1) if a.smoke_cpu else \
        dict(FLUX, depth=a.depth[0], depth_single_blocks=a.depth[1])
    size = 128 if a.smoke_cpu else a.size
    case = ModelCase("flux", params)
    work = Path(a.work_dir) / case.tag()
    work.mkdir(parents=True, exist_ok=True)
    src = work / "bf16.safetensors"
    if not src.exists():
        from safetensors.torch import save_file

        save_file(seeded_state_dict(case, dev if cuda else "cpu"), str(src) + ".tmp")
        os.replace(str(src) + ".tmp", src)
    formats = [f for f in a.formats.split(",") if f]
    for f in formats:
        plan_fields(f, "flux")  # unknown names fail before any work

    def converted(fmt):
        out = work / f"{fmt.replace('+', '_')}.safetensors"
        if not out.exists():
            opts = PlanOptions(presets=(PRESET["flux"],), **plan_fields(fmt, "flux"))
            convert_file(str(src), str(out), opts, device=str(dev), overwrite=True, error_stats=False)
        return out

    lora_sd = None
    if a.lora:
        lora_sd = lora_state_dict(layer_shapes(case, src), "flux", a.lora_rank)
    x, sigma, kw, tokens = inputs(case, size, dev, 16 if a.smoke_cpu else a.text_tokens)

    def unload():
        mm.unload_all_models()
        import gc

        gc.collect()
        mm.soft_empty_cache()

    def run(fmt, mode, path, lora):
        if mode == "stock":
            sd, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
            patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={}, metadata=metadata)
        else:
            patcher, _ = backend.load_diffusion_model(str(path), disable_dynamic=(mode == "classic"))
        if lora:
            patcher, _ = comfy.sd.load_lora_for_models(patcher, None, lora_sd, 1.0, 0)
        row = {"format": fmt, "mode": mode, "lora": lora, "patcher": type(patcher).__name__,
               "dynamic": bool(patcher.is_dynamic()), "weights_gb": os.path.getsize(path) / GIB,
               "model_size_gb": patcher.model_size() / GIB}
        acc = dynamic_vram.accounting(patcher.model)
        row["vbar_gb"], row["resident_gb"] = acc["vbar"] / GIB, acc["resident"] / GIB
        base = patcher.model

        def step():
            with torch.inference_mode():
                return base.apply_model(x, sigma, **kw)

        with Peak(dev) as peak:
            mm.load_models_gpu([patcher])
            for _ in range(a.warmup):
                step()
            ts, y = [], None
            for _ in range(a.steps):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                y = step()
                if cuda:
                    torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) * 1e3)
        row["step_ms"] = statistics.median(ts)
        row["loaded_gb"] = patcher.loaded_size() / GIB
        row["paths"] = layer_paths(patcher, mode == "stock")[0]
        if cuda:
            row["peak_used_gb"], row["base_used_gb"] = peak.peak / GIB, peak.base / GIB
            row["peak_torch_gb"] = torch.cuda.max_memory_allocated(dev) / GIB
            row["under_cap"] = peak.peak <= a.cap_gb * GIB
        return row, y.float().cpu()  # the caller unloads once this frame's references are gone

    rows, notes = [], []
    if not core_dynamic_vram():
        notes.append("core_dynamic_vram() is False: the pack keeps disable_dynamic on this core")
    # Every file first, then the device is emptied: a conversion on the GPU leaves cached blocks that
    # would count as "in use" before the first row's load (seen on the H200: 1.7-3.0 GiB at 1.5 GiB cap).
    paths = {fmt: converted(fmt) for fmt in formats + (["float8_e4m3fn"] if a.stock else [])}
    unload()
    if cuda:
        torch.cuda.empty_cache()
    for fmt in formats:
        path = paths[fmt]
        if os.path.getsize(path) <= a.cap_gb * GIB and not a.smoke_cpu:
            notes.append(f"{fmt}: file {os.path.getsize(path) / GIB:.2f} GiB fits in the {a.cap_gb} GiB cap "
                         f"(not a partial-load test; raise --depth)")
        for lora in [v for v in ([False, True] if a.lora else [False]) if v or not a.no_plain]:
            classic, ref = run(fmt, "classic", path, lora)
            unload()
            dyn, out = run(fmt, "dynamic", path, lora)
            unload()
            dyn["rel_err"] = float((out - ref).norm() / ref.norm())
            dyn["ratio"] = classic["step_ms"] / dyn["step_ms"]
            classic["ratio"] = 1.0
            rows += [dyn, classic]
            print(fmt_row(dyn), flush=True)
            print(fmt_row(classic), flush=True)
    if a.stock:
        row, _ = run("stock_fp8", "stock", paths["float8_e4m3fn"], False)
        unload()
        rows.append(row)
        print(fmt_row(row), flush=True)

    head = (f"bench_dynamic_vram: ComfyUI {version}, {torch.cuda.get_device_name(dev) if cuda else 'cpu'}, "
            f"torch {torch.__version__}, commit {commit()}; cap {a.cap_gb} GiB (--reserve-vram "
            f"{reserve / GIB:.2f}), Flux depth {params['depth']}/{params['depth_single_blocks']} "
            f"hidden {params['hidden_size']}, {size}px ({tokens} image tokens), {a.steps} steps")
    print(head)
    for n in notes:
        print("note:", n)
    if a.json:
        import json

        Path(a.json).write_text(json.dumps({"header": head, "command": "python bench/bench_dynamic_vram.py "
                                            + " ".join(sys.argv[1:] if argv is None else argv),
                                            "rows": rows, "notes": notes}, indent=1) + "\n")
    return rows


def fmt_row(r) -> str:
    cells = [f"{r['format']:>15} {r['mode']:>8}{' +lora' if r['lora'] else '      '} {r['patcher']:>30}",
             f"step {r['step_ms']:9.1f} ms", f"ratio {r.get('ratio', float('nan')):5.2f}",
             f"weights {r['weights_gb']:6.2f} GiB (model_size {r['model_size_gb']:6.2f})",
             f"vbar {r['vbar_gb']:6.2f} resident {r['resident_gb']:5.2f} loaded {r['loaded_gb']:6.2f}"]
    if "peak_used_gb" in r:
        cells.append(f"peak used {r['peak_used_gb']:6.2f} GiB (before load {r['base_used_gb']:.2f}) "
                     f"torch {r['peak_torch_gb']:6.2f} "
                     f"{'under cap' if r['under_cap'] else 'OVER CAP'}")
    if "rel_err" in r:
        cells.append(f"rel_err vs classic {r['rel_err']:.2e}")
    cells.append("layers " + ", ".join(f"{k} x{v}" for k, v in sorted(r["paths"].items())))
    return " | ".join(cells)


if __name__ == "__main__":
    main()
