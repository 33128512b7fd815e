"""Whole-model benchmark in real ComfyUI: ComfyUI's own Flux / Wan classes, every pack format, eager,
CUDA graph and torch.compile, LoRA, against bf16 and stock ComfyUI FP8 measured in the same process.

    PYTHONPATH=<parent of hybridquant> python bench/bench_model.py --comfy $COMFY \
        [--models flux,wan] [--formats float8_e4m3fn,bnb_nf4,...] [--sizes 512,1024,1536] \
        [--depth 5 10 | --full] [--compile] [--lora] [--json F] [--md F] [--budget-s S]
    python bench/bench_model.py --device cpu --tiny --json out.json     # end-to-end smoke run (CPU)
    python bench/bench_model.py --merge a.json b.json --json all.json --md all.md   # join split runs

Flow per model: seeded bf16 weights (std 0.5/sqrt(fan_in), norms 1, biases ~0) saved under real key names
(``model.diffusion_model.*``) -> ``converter.convert_file`` with the model's preset per format -> loaded by
``nodes.backend.load_diffusion_model`` (the pack's loaders) or ``comfy.sd.load_diffusion_model_state_dict``
(stock rows) -> ``comfy.model_management.load_models_gpu`` -> ``BaseModel.apply_model`` (what the
sampler calls), with the patcher's wrappers in ``transformer_options`` (how ComfyUI's TorchCompileModel
node's ``set_torch_compile_wrapper`` reaches the model).

Columns (times in ms):
- ``ms``: median wall time of N eager forwards, each between ``torch.cuda.synchronize()`` calls, after warmup.
- ``gpu_only_ms``: median CUDA-graph replay time of the captured forward (null + ``graph_error`` if
  capture fails, e.g. a host sync or host->device copy inside the forward).
- ``host_ms``: CPU time to enqueue one forward: ``torch.cuda._sleep`` first queues a GPU spin longer than
  the forward, so the GPU never makes the host wait; the Python call is timed without synchronizing
  (median of 5). If the spin had already ended when the call returned (a sync inside the forward, or
  the launch queue filled) the row gets ``host_note``: then host_ms is an upper bound. On CPU: = ms.
- ``peak_vram_gb``: ``torch.cuda.max_memory_allocated`` over one forward (reset before), weights included.
- ``weights_gb``: stored bytes (file size); ``rel_err``: ||y - y_bf16|| / ||y_bf16|| (LoRA rows: vs bf16+LoRA).
- ``paths``: Counter of ``layer.hq_last_path`` over the pack's quantized layers (stock rows: ops classes).
- compile rows: ``compile_s`` = first call (compilation) time, excluded from ms; ratios vs compiled bf16/stock.
- LoRA rows: rank-64 LoRA on every attention projection via ``comfy.sd.load_lora_for_models``;
  ``lora_overhead`` = ms / ms of the same format without LoRA - 1.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Flux.1-dev and Wan 2.1 14B widths (depth reduced unless --full).
FLUX = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
            num_heads=24, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
            txt_ids_dims=[])
FLUX_TINY = dict(FLUX, hidden_size=256, num_heads=2, context_in_dim=128)
WAN = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=5120, ffn_dim=13824, freq_dim=256,
           text_dim=4096, out_dim=16, num_heads=40, num_layers=4, window_size=(-1, -1), qk_norm=True,
           cross_attn_norm=True, eps=1e-6)
WAN_TINY = dict(WAN, dim=256, ffn_dim=512, num_heads=2, num_layers=1)
PRESET = {"flux": "flux1", "wan": "wan"}
MIXED_FP8_LAYERS = {"flux": r"attn\.(qkv|proj)$", "wan": r"(self_attn|cross_attn)\.(q|k|v|o)$"}
LORA_LAYERS = {"flux": r"(attn\.(qkv|proj)|single_blocks\.\d+\.linear[12])$", "wan": r"(self_attn|cross_attn)\.(q|k|v|o)$"}
COMPILE_DEFAULT = ("bf16", "stock_fp8", "float8_e4m3fn", "mxfp8", "hybrid_mxfp8")
EXTRA_FORMATS = ("mixed_nf4_fp8", "bnb_nf4+svd32", "bnb_nf4+hadamard")


# ---- formats ------------------------------------------------------------------------------------
def registry_formats() -> dict[str, dict]:
    """Row name -> PlanOptions fields, from the registry (a second variant of a format gets ``+key``)."""
    from hybridquant.converter.formats import registry
    from hybridquant.converter.plan import SCALING_MODES

    out, seen = {}, set()
    for spec, v in registry.choices():
        name = spec.name if spec.name not in seen else f"{spec.name}+{v.key}"
        seen.add(spec.name)
        opts = {"mode": spec.family}
        if v.key in SCALING_MODES:
            opts["scaling_mode"] = v.key
        elif v.key:
            opts["bnb_quant_type"] = v.key
        out[name] = opts
    return out


def plan_fields(name: str, model: str) -> dict:
    """PlanOptions fields for a row name: a registry row, ``mixed_nf4_fp8``, or ``BASE+svdR`` / ``BASE+hadamard``."""
    base = registry_formats()
    if name in base:
        return dict(base[name])
    if name == "mixed_nf4_fp8":
        return {"mode": "bnb4bit", "bnb_quant_type": "nf4", "custom_layers": MIXED_FP8_LAYERS[model], "custom_type": "fp8"}
    head, *mods = name.split("+")
    if head not in base and head != "mixed_nf4_fp8":
        raise SystemExit(f"--formats: unknown format {name!r}; known: {', '.join([*base, *EXTRA_FORMATS])}")
    out = plan_fields(head, model)
    for m in mods:
        if m.startswith("svd") and m[3:].isdigit():
            out["svd_rank"] = int(m[3:])
        elif m.startswith("hadamard"):
            out["rotate"] = m
        elif m in ("row", "block", "tensor"):
            out["scaling_mode"] = m
        else:
            raise SystemExit(f"--formats: unknown modifier {m!r} in {name!r} (svdR, hadamard, row, block)")
    return out


# ---- models ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelCase:
    kind: str  # "flux" | "wan"
    params: dict
    seed: int = 0

    def build(self, device="meta"):
        import comfy.ops

        if self.kind == "flux":
            from comfy.ldm.flux import model as fm

            fields = {f.name for f in dataclasses.fields(fm.FluxParams)}
            kw = {k: v for k, v in self.params.items() if k in fields}
            return fm.Flux(dtype=torch.bfloat16, device=device, operations=comfy.ops.disable_weight_init, **kw)
        from comfy.ldm.wan.model import WanModel

        return WanModel(dtype=torch.bfloat16, device=device, operations=comfy.ops.disable_weight_init, **self.params)

    def tag(self) -> str:
        return f"{self.kind}_{zlib.crc32(json.dumps([self.params, self.seed], sort_keys=True).encode()):08x}"


def seeded_state_dict(case: ModelCase, gen_device) -> dict:
    """Real key names from ComfyUI's own class, seeded values that keep activations O(1)."""
    model = case.build("meta")
    sd = {}
    for name, t in model.state_dict().items():
        g = torch.Generator(device=gen_device).manual_seed(case.seed + zlib.crc32(name.encode()))
        shape = tuple(t.shape)
        if "modulation" in name and t.ndim >= 2 and not name.endswith(".weight"):
            v = torch.randn(shape, generator=g, device=gen_device) * 0.02
        elif t.ndim >= 2:
            fan_in = max(1, t[0].numel())
            v = torch.randn(shape, generator=g, device=gen_device) * (0.5 / fan_in ** 0.5)
        elif name.endswith("bias"):
            v = torch.randn(shape, generator=g, device=gen_device) * 0.01
        else:  # norm scales / weights
            v = torch.ones(shape, device=gen_device)
        sd["model.diffusion_model." + name] = v.to(torch.bfloat16).cpu()
    return sd


def lora_state_dict(model_sd_keys, kind: str, rank: int, seed: int = 1) -> dict:
    """Rank-``rank`` LoRA (ComfyUI's generic ``<key>.lora_up/down.weight`` names) on the attention projections."""
    import re

    pat, out = re.compile(LORA_LAYERS[kind]), {}
    for key, shape in model_sd_keys.items():
        layer = key[: -len(".weight")]
        if not key.endswith(".weight") or len(shape) != 2 or not pat.search(layer):
            continue
        g = torch.Generator().manual_seed(seed + zlib.crc32(layer.encode()))
        n, k = shape
        base = "diffusion_model." + layer
        out[base + ".lora_down.weight"] = (torch.randn(rank, k, generator=g) / k ** 0.5).to(torch.bfloat16)
        out[base + ".lora_up.weight"] = (torch.randn(n, rank, generator=g) * (0.05 / rank ** 0.5)).to(torch.bfloat16)
        out[base + ".alpha"] = torch.tensor(float(rank))
    return out


def inputs(case: ModelCase, size, device, text_tokens: int):
    """(x, sigma, kwargs for apply_model, token count) for a Flux image side ``size`` or a Wan latent (T, H, W)."""
    g = torch.Generator().manual_seed(1234)
    ctx_dim = case.params["context_in_dim"] if case.kind == "flux" else case.params["text_dim"]
    ctx = torch.randn(1, text_tokens, ctx_dim, generator=g).to(device, torch.bfloat16)
    sigma = torch.tensor([0.5], device=device)
    if case.kind == "flux":
        x = torch.randn(1, 16, size // 8, size // 8, generator=g).to(device, torch.bfloat16)
        y = torch.randn(1, case.params["vec_in_dim"], generator=g).to(device, torch.bfloat16)
        kw = {"c_crossattn": ctx, "y": y, "guidance": torch.tensor([3.5], device=device)}
        return x, sigma, kw, (size // 16) ** 2
    t, h, w = size
    x = torch.randn(1, 16, t, h, w, generator=g).to(device, torch.bfloat16)
    return x, sigma, {"c_crossattn": ctx}, t * (h // 2) * (w // 2)


def wan_latent(tokens: int, frames: int = 21) -> tuple[int, int, int]:
    if tokens == 32760:
        return (21, 60, 104)  # 81 frames at 480x832
    per = max(1, round(tokens / frames))
    ph = max(1, int(per ** 0.5))
    return (frames, 2 * ph, 2 * -(-per // ph))


# ---- ComfyUI ---------------------------------------------------------------------------------------
def import_comfy(root: str, cpu: bool):
    if not (Path(root) / "comfy" / "ops.py").is_file():
        raise SystemExit(f"--comfy: no ComfyUI tree at {root}")
    sys.path.insert(0, root)
    saved, sys.argv = sys.argv, [sys.argv[0]] + (["--cpu"] if cpu else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_detection
        import comfy.model_management
        import comfy.sd  # noqa: F401
    finally:
        sys.argv = saved
    # 0.3.75 detects Flux with 24 heads whatever the width; 0.33 derives hidden // sum(axes_dim). Only the
    # tiny widths need 0.33's rule on 0.3.75 (a no-op at Flux.1 widths).
    orig = comfy.model_detection.detect_unet_config

    def detect(state_dict, key_prefix, *a, **k):
        cfg = orig(state_dict, key_prefix, *a, **k)
        if isinstance(cfg, dict) and cfg.get("image_model") == "flux":
            cfg["num_heads"] = cfg["hidden_size"] // sum(cfg["axes_dim"])
        return cfg

    comfy.model_detection.detect_unet_config = detect
    import comfyui_version

    return comfyui_version.__version__


def load(path: str, stock: bool):
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    from hybridquant.nodes import backend

    if stock:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        fn = comfy.sd.load_diffusion_model_state_dict
        patcher = fn(sd, **backend._with_dynamic_flag(fn, {"model_options": {}, "metadata": metadata}))
    else:
        patcher, _ = backend.load_diffusion_model(path)
    mm.load_models_gpu([patcher], force_full_load=True)
    return patcher


def unload():
    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def layer_paths(patcher, stock: bool) -> tuple[dict, str | None]:
    paths, label = collections.Counter(), None
    for m in patcher.model.diffusion_model.modules():
        if type(m).__name__ != "Linear" and not isinstance(m, torch.nn.Linear):
            continue  # stock MixedPrecisionOps' Linear is not always a torch.nn.Linear subclass
        if stock:
            w = getattr(m, "weight", None)
            if type(w).__name__ == "QuantizedTensor":
                label = "native_quant (comfy_quant, QuantizedTensor)"
            elif hasattr(m, "scale_weight") and label is None:
                label = "scaled_fp8"
            paths[type(m).__qualname__.split(".")[0] + ":" + str(getattr(w, "dtype", "?")).replace("torch.", "")] += 1
        elif getattr(m, "hq_format", None) is not None:
            paths[f"{m.hq_format}:{getattr(m, 'hq_last_path', '?')}"] += 1
        else:
            paths["plain"] += 1
    return dict(paths), label


# ---- timing ----------------------------------------------------------------------------------------
def sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def time_eager(fwd, n, warmup, cuda):
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


def time_graph(fwd, n):
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


def time_host(fwd, ms_eager):
    global _CYCLES_PER_MS
    if _CYCLES_PER_MS is None:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)
        a.record()
        torch.cuda._sleep(20_000_000)
        b.record()
        b.synchronize()
        _CYCLES_PER_MS = 20_000_000 / a.elapsed_time(b)
    spin_ms = 3 * ms_eager + 50
    ts, note = [], None
    for _ in range(5):
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


def peak_vram(fwd):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fwd()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


# ---- the run ---------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args, device):
        self.a, self.dev, self.cuda = args, device, device.type == "cuda"
        self.rows, self.notes, self.refs = [], [], {}
        self.t0 = time.monotonic()
        self.longest = 0.0

    def over_budget(self, what):
        if self.a.budget_s is None:
            return False
        left = self.a.budget_s - (time.monotonic() - self.t0)
        if left < self.longest:
            self.notes.append(f"skipped {what}: {left:.0f} s of --budget-s left, a format took up to {self.longest:.0f} s")
            print(f"[bench_model] {self.notes[-1]}", flush=True)
            return True
        return False

    def measure(self, case, fmt, patcher, sizes, stock=False, compile_=False, lora=False, weights_gb=None, extra=None):
        import comfy.patcher_extension as pe

        base = patcher.model
        for size in sizes:
            x, sigma, kw, tokens = inputs(case, size, self.dev, self.a.text_tokens)
            topts = {"wrappers": pe.copy_nested_dicts(patcher.wrappers)} if compile_ else {}

            def fwd():
                with torch.inference_mode():
                    return base.apply_model(x, sigma, transformer_options=topts, **kw)

            row = {"model": case.kind, "format": fmt, "size": size if case.kind == "flux" else "x".join(map(str, size)),
                   "tokens": tokens, "compile": compile_, "lora": lora, **(extra or {})}
            try:
                if compile_:
                    t = time.perf_counter()
                    fwd()
                    sync(self.cuda)
                    row["compile_s"] = round(time.perf_counter() - t, 2)
                y = fwd()
                sync(self.cuda)
                row["ms"] = time_eager(fwd, self.a.n, self.a.warmup, self.cuda)
                row["paths"], label = layer_paths(patcher, stock)
                if label:
                    row["stock_path"] = label
                if self.cuda and not self.a.no_graph and not compile_:
                    row["gpu_only_ms"], err = time_graph(fwd, self.a.n)
                    if err:
                        row["graph_error"] = err
                else:
                    row["gpu_only_ms"] = None
                    row["graph_error"] = "not measured (CPU device)" if not self.cuda else (
                        "not measured (compile row)" if compile_ else "--no-graph")
                if self.cuda:
                    row["host_ms"], note = time_host(fwd, row["ms"])
                    if note:
                        row["host_note"] = note
                    row["peak_vram_gb"] = round(peak_vram(fwd), 3)
                else:
                    row["host_ms"], row["peak_vram_gb"] = row["ms"], None
                ref_key = (case.kind, str(size), lora)
                yf = y.float().cpu()
                if fmt == "bf16" and not compile_:
                    self.refs[ref_key] = yf
                ref = self.refs.get(ref_key)
                row["rel_err"] = float((yf - ref).norm() / ref.norm()) if ref is not None else None
                if stock and fmt != "bf16" and row["rel_err"] is not None and row["rel_err"] > 0.1:
                    row["stock_note"] = "stock output far from bf16: this core did not apply the FP8 scales"
                if not torch.isfinite(yf).all():
                    row["nonfinite_output"] = True
            except Exception as e:  # noqa: BLE001 - one failing row must not end the run
                row.setdefault("ms", None)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"[bench_model] {fmt} {size}: {row['error']}", flush=True)
            row["weights_gb"] = weights_gb
            self.rows.append(row)
            print(f"[bench_model] {case.kind} {fmt} {row['size']} compile={compile_} lora={lora}: "
                  f"ms={row.get('ms')} graph={row.get('gpu_only_ms')} host={row.get('host_ms')} "
                  f"err={row.get('rel_err')}", flush=True)

    def format_rows(self, case, fmt, path, sizes, stock, lora_sd):
        t = time.monotonic()
        wgb = round(os.path.getsize(path) / 1e9, 3)
        patcher = load(path, stock)
        extra = {"stock_path": None} if stock else {}
        self.measure(case, fmt, patcher, sizes, stock=stock, weights_gb=wgb, extra=extra)
        if lora_sd is not None and fmt in self.a.lora_formats_for(fmt):
            import comfy.model_management as mm
            import comfy.sd

            lp, _ = comfy.sd.load_lora_for_models(patcher, None, lora_sd, 1.0, 0)
            mm.load_models_gpu([lp], force_full_load=True)
            self.measure(case, fmt, lp, sizes, stock=stock, lora=True, weights_gb=wgb, extra=dict(extra))
            del lp
            unload()
            patcher = load(path, stock)
        if self.a.compile and fmt in self.a.compile_formats:
            import comfy.model_management as mm
            from comfy_api.torch_helpers import set_torch_compile_wrapper

            cp = patcher.clone()
            set_torch_compile_wrapper(model=cp, backend=self.a.compile_backend)
            mm.load_models_gpu([cp], force_full_load=True)
            self.measure(case, fmt, cp, [s for s in sizes if s in self.a.compile_sizes] or sizes[:1],
                         stock=stock, compile_=True, weights_gb=wgb, extra=dict(extra))
            del cp
            torch._dynamo.reset()
        del patcher
        unload()
        self.longest = max(self.longest, time.monotonic() - t)

    def run_model(self, case: ModelCase, sizes, formats):
        from hybridquant.converter import PlanOptions, convert_file

        work = Path(self.a.work_dir) / case.tag()
        work.mkdir(parents=True, exist_ok=True)
        src = work / "bf16.safetensors"
        if not src.exists():
            from safetensors.torch import save_file

            t = time.monotonic()
            sd = seeded_state_dict(case, self.dev if self.cuda else "cpu")
            save_file(sd, str(src) + ".tmp")
            os.replace(str(src) + ".tmp", src)
            print(f"[bench_model] {case.kind}: saved {src} ({os.path.getsize(src) / 1e9:.2f} GB, "
                  f"{time.monotonic() - t:.1f} s)", flush=True)
            del sd
        from safetensors import safe_open

        with safe_open(str(src), "pt") as f:
            shapes = {k[len("model.diffusion_model."):]: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        lora_sd = lora_state_dict(shapes, case.kind, self.a.lora_rank) if self.a.lora else None

        def converted(fmt):
            out = work / f"{fmt.replace('+', '_')}.safetensors"
            if not out.exists():
                t = time.monotonic()
                opts = PlanOptions(presets=(PRESET[case.kind],), **plan_fields(fmt, case.kind))
                convert_file(str(src), str(out), opts, device=str(self.dev), overwrite=True, error_stats=False)
                self.convert_s[fmt] = round(time.monotonic() - t, 1)
            return out

        self.convert_s = {}
        self.format_rows(case, "bf16", str(src), sizes, True, lora_sd)
        if not self.a.no_stock:
            if not self.over_budget(f"{case.kind} stock_fp8 and later"):
                fp8 = converted("float8_e4m3fn")
                self.format_rows(case, "stock_fp8", str(fp8), sizes, True, lora_sd)
        for fmt in formats:
            if self.over_budget(f"{case.kind} {fmt} and later"):
                break
            try:
                path = converted(fmt)
            except Exception as e:  # noqa: BLE001
                self.rows.append({"model": case.kind, "format": fmt, "size": None, "compile": False, "ms": None,
                                  "error": f"convert: {type(e).__name__}: {str(e)[:300]}"})
                continue
            self.format_rows(case, fmt, str(path), sizes, False, lora_sd)
            for r in self.rows:
                if r["format"] == fmt and r["model"] == case.kind:
                    r["convert_s"] = self.convert_s.get(fmt)
            if not self.a.keep_files:
                path.unlink(missing_ok=True)
        if not self.a.keep_files:
            (work / "float8_e4m3fn.safetensors").unlink(missing_ok=True)


def add_ratios(rows):
    def key(r, fmt, lora=False):
        return (r["model"], str(r["size"]), r["compile"], fmt, lora)

    by = {(r["model"], str(r["size"]), r["compile"], r["format"], r.get("lora", False)): r for r in rows}
    for r in rows:
        b = by.get(key(r, "bf16"))
        s = by.get(key(r, "stock_fp8"))
        r["bf16_ms"] = b.get("ms") if b else None
        r["stock_fp8_ms"] = s.get("ms") if s else None
        ms = r.get("ms")
        r["speed_vs_bf16"] = round(r["bf16_ms"] / ms, 4) if ms and r["bf16_ms"] else None
        r["speed_vs_stock_fp8"] = round(r["stock_fp8_ms"] / ms, 4) if ms and r["stock_fp8_ms"] else None
        for k in ("gpu_only_ms", "host_ms", "peak_vram_gb", "rel_err"):
            r.setdefault(k, None)
        if r.get("lora"):
            base = by.get(key(r, r["format"]))
            r["lora_overhead"] = round(ms / base["ms"] - 1, 4) if ms and base and base.get("ms") else None


def commit() -> str:
    try:
        c = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return c + ("+dirty" if dirty else "") if c else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fmt_cell(v, spec="{:.2f}"):
    return "–" if v is None else spec.format(v)


def markdown(result, command):
    lines = [f"# Whole-model benchmark ({result['device']})", "",
             f"Command: `{command}`  ", f"Commit {result['commit']}; torch {result['torch']}; "
             f"ComfyUI {result['comfyui']}. Ratios vs bf16 / stock ComfyUI FP8 measured in the same run "
             "(compile rows: vs compiled bf16/stock). Method: bench/bench_model.py docstring.", "",
             "| model | format | size | compile | LoRA | ms | vs bf16 | vs stock FP8 | GPU-only ms | host ms | "
             "peak VRAM GB | weights GB | rel err | paths |", "|---" * 14 + "|"]
    for r in result["rows"]:
        paths = ", ".join(f"{k}×{v}" for k, v in (r.get("paths") or {}).items())
        if r.get("error"):
            paths = "error: " + r["error"][:80]
        elif r.get("graph_error") and r.get("gpu_only_ms") is None and result["device"] != "cpu":
            paths += f" (graph: {r['graph_error'][:60]})"
        lora = "yes" + (f" (+{100 * r['lora_overhead']:.0f}%)" if r.get("lora_overhead") is not None else "") if r.get("lora") else ""
        lines.append(f"| {r['model']} | {r['format']} | {r['size']} | {'yes' if r['compile'] else ''} | {lora} | "
                     f"{fmt_cell(r.get('ms'))} | {fmt_cell(r.get('speed_vs_bf16'), '{:.2f}×')} | "
                     f"{fmt_cell(r.get('speed_vs_stock_fp8'), '{:.2f}×')} | {fmt_cell(r.get('gpu_only_ms'))} | "
                     f"{fmt_cell(r.get('host_ms'))} | {fmt_cell(r.get('peak_vram_gb'))} | "
                     f"{fmt_cell(r.get('weights_gb'))} | {fmt_cell(r.get('rel_err'), '{:.2e}')} | {paths} |")
    lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("HYBRIDQUANT_COMFYUI", str(REPO / ".comfyui" / "ComfyUI")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny widths, depth 1, 64 image tokens (smoke test)")
    ap.add_argument("--models", default="flux,wan")
    ap.add_argument("--formats", default=None, help="comma list (default: every registry format + "
                    f"{', '.join(EXTRA_FORMATS)}); BASE+svdR / BASE+hadamard combine")
    ap.add_argument("--sizes", default="512,1024,1536", help="Flux image sides in pixels")
    ap.add_argument("--depth", nargs=2, type=int, default=(5, 10), metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--full", action="store_true", help="Flux 19/38 blocks, Wan 40 layers")
    ap.add_argument("--wan-depth", type=int, default=4)
    ap.add_argument("--wan-tokens", type=int, default=32760, help="video tokens (default 81 frames 480x832)")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock_fp8 rows")
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows (TorchCompileModel's wrapper)")
    ap.add_argument("--compile-formats", default=",".join(COMPILE_DEFAULT))
    ap.add_argument("--compile-sizes", default="1024")
    ap.add_argument("--compile-backend", default="inductor", help="TorchCompileModel's backend (inductor, cudagraphs; "
                    "eager/aot_eager to check the mechanism)")
    ap.add_argument("--lora", action="store_true", help="add rank --lora-rank LoRA rows")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--lora-formats", default="all")
    ap.add_argument("--budget-s", type=float, default=None, help="skip remaining formats past this many seconds")
    ap.add_argument("--work-dir", default=str(REPO / ".cache" / "bench_model"))
    ap.add_argument("--keep-files", action="store_true", help="keep converted files (reused by later runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    a = ap.parse_args(argv)
    a.compile_formats = set(a.compile_formats.split(","))
    a.compile_sizes = [int(s) for s in a.compile_sizes.split(",") if s]
    lf = None if a.lora_formats == "all" else set(a.lora_formats.split(","))
    a.lora_formats_for = lambda fmt: {fmt} if lf is None or fmt in lf else set()
    return a


def merge(paths, json_out, md_out):
    """One JSON/MD from several runs (e.g. a split across GPU calls): rows concatenated with ``run`` = the
    index of their file; each run's ratios stay against the baselines of its own process."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = [dict(r, run=i) for i, res in enumerate(runs) for r in res["rows"]]
    head = runs[0]
    result = {"device": head["device"], "torch": head["torch"], "commit": head["commit"],
              "comfyui": head.get("comfyui"), "rows": rows,
              "notes": [n for res in runs for n in res.get("notes", [])],
              "runs": [{"file": os.fspath(p), "commit": res["commit"], "command": res.get("command")} for p, res in zip(paths, runs)]}
    command = "; ".join(res.get("command") or "?" for res in runs)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = markdown(result, command)
    if md_out:
        Path(md_out).write_text(md)
    print(md)


def main(argv=None):
    if (argv if argv is not None else sys.argv[1:])[:1] == ["--merge"]:
        ap = argparse.ArgumentParser(prog="bench_model.py --merge")
        ap.add_argument("--merge", nargs="+", required=True)
        ap.add_argument("--json")
        ap.add_argument("--md")
        m = ap.parse_args(argv)
        return merge(m.merge, m.json, m.md)
    a = parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --tiny for the smoke run)")
    version = import_comfy(a.comfy, cpu=dev.type == "cpu")
    models = [m for m in a.models.split(",") if m]
    formats = a.formats.split(",") if a.formats else [*registry_formats(), *EXTRA_FORMATS]
    for m in models:
        for f in formats:
            plan_fields(f, m if m in PRESET else "flux")  # unknown names fail before any work
    r = Runner(a, dev)
    if a.tiny:
        a.text_tokens = min(a.text_tokens, 16)
    for m in models:
        if m == "flux":
            d, s = (19, 38) if a.full else a.depth
            p = dict(FLUX_TINY if a.tiny else FLUX, depth=1 if a.tiny else d, depth_single_blocks=1 if a.tiny else s)
            sizes = [128] if a.tiny else [int(x) for x in a.sizes.split(",") if x]
        elif m == "wan":
            try:
                import comfy.ldm.wan.model  # noqa: F401
            except ImportError as e:
                r.notes.append(f"wan skipped: this ComfyUI tree has no comfy.ldm.wan.model ({e})")
                continue
            p = dict(WAN_TINY if a.tiny else WAN, num_layers=1 if a.tiny else (40 if a.full else a.wan_depth))
            sizes = [(2, 8, 8)] if a.tiny else [wan_latent(a.wan_tokens)]
        else:
            raise SystemExit(f"--models: unknown model {m!r} (flux, wan)")
        r.run_model(ModelCase(m, p), sizes, formats)
    add_ratios(r.rows)
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "commit": commit(), "comfyui": version, "rows": r.rows, "notes": r.notes,
              "elapsed_s": round(time.monotonic() - r.t0, 1)}
    command = "python bench/bench_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result["command"] = command
    md = markdown(result, command)
    print(md)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    if a.md:
        Path(a.md).write_text(md)


if __name__ == "__main__":
    main()
