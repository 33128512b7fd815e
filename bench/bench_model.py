"""Whole-model benchmark in real ComfyUI: ComfyUI's own Flux / Wan classes, every pack format, eager,
CUDA graph and torch.compile, LoRA, against bf16 and stock ComfyUI FP8 measured in the same process.

    PYTHONPATH=<parent of hybridquant> python bench/bench_model.py --comfy $COMFY \\
        [--models flux,wan] [--formats float8_e4m3fn,bnb_nf4,...] [--sizes 512,1024,1536] \\
        [--depth 5 10 | --full] [--repeats 3] [--compile [--compile-models flux]] [--eager-models flux,wan] \\
        [--lora] [--json F] [--md F] [--budget-s S] [--knob NAME=MODULE.ATTR=VALUE ... --formats F,F@NAME]
    python bench/bench_model.py --device cpu --tiny --json out.json     # end-to-end smoke run (CPU)
    python bench/bench_model.py --merge a.json b.json --json all.json --md all.md   # join split runs

Modules: model_zoo (models, seeded files, inputs), model_formats (row names -> converter options),
model_comfy (ComfyUI import/load, stock checks, resident bytes), model_timing (timers), model_budget
(--budget-s), model_runner (variants, interleaved rounds), model_report (ratios, JSON, markdown, merge).

Flow per model: seeded bf16 weights (std 0.5/sqrt(fan_in), norms 1, biases ~0) saved under the key names
of a ``diffusion_models`` file (``--key-prefix model.diffusion_model.`` for a checkpoint's) ->
``converter.convert_file`` with the model's preset per format -> loaded by
``nodes.backend.load_diffusion_model`` (the pack's loaders) or ``comfy.sd.load_diffusion_model_state_dict``
(stock rows) -> ``comfy.model_management.load_models_gpu`` -> ``BaseModel.apply_model`` (what the
sampler calls), with the patcher's wrappers in ``transformer_options`` (how ComfyUI's TorchCompileModel
node's ``set_torch_compile_wrapper`` reaches the model). Every variant stays loaded; rows are timed in
``--repeats`` interleaved rounds (bf16, stock, each format, then again), see model_runner.

Columns (times in ms):
- ``ms``: per round the median wall time of ``--n`` eager forwards, each between
  ``torch.cuda.synchronize()`` calls, after ``--warmup``; the row's ``ms`` is the median over rounds,
  ``ms_min``/``ms_max`` the spread, ``repeats`` the rounds run (fewer if ``--budget-s`` cut it).
- ``gpu_only_ms``: median CUDA-graph replay time of the captured forward, per round, median over rounds
  (null + ``graph_error`` if capture fails, e.g. a host sync or host->device copy inside the forward).
- ``host_ms``: CPU time to enqueue one forward: ``torch.cuda._sleep`` first queues a GPU spin longer than
  the forward, so the GPU never makes the host wait; the Python call is timed without synchronizing
  (median of ``--host-samples``, then over rounds). If the spin ended before the call returned (a sync in
  the forward, or the launch queue filled) the row gets ``host_note``: host_ms is an upper bound. CPU: = ms.
- ``peak_vram_gb`` = ``resident_gb`` (this model's parameters, buffers and LoRA patches on the GPU) +
  ``transient_gb`` (``max_memory_allocated`` during one forward above the allocation before it); other
  resident models are not counted.
- ``weights_gb``: stored bytes (file size); ``rel_err``: ||y - y_bf16|| / ||y_bf16||, worst over rounds
  (LoRA rows: vs bf16+LoRA; compile rows: vs eager bf16).
- ``FMT@NAME`` rows (``--knob NAME=MODULE.ATTR=VALUE``): FMT's file, loaded as its own model, with the pack
  constant ``hybridquant.ops.MODULE.ATTR`` set to VALUE only while this row's forwards run -- a dispatch
  switch measured against the default in the same process (e.g. ``linear_paths.FP8_ROWWISE_TRITON``).
- ``paths``: Counter of ``layer.hq_last_path`` over the pack's quantized layers (stock rows: ops class and
  weight type).
- ``stock_fp8``: the pack's tensorwise FP8 file loaded by stock ComfyUI. If that core did not load every
  FP8 layer as FP8, or its output is > 0.1 from bf16, the row has ``unsupported`` (the reason) and no
  times (model_comfy docstring: what 0.3.75 does with a key-prefixed file).
- compile rows: ``compile_s`` = first call (compilation) time, excluded from ms; ratios vs compiled bf16/stock.
- LoRA rows: rank-64 LoRA on every attention projection via ``comfy.sd.load_lora_for_models``;
  ``lora_overhead`` = ms / ms of the same format without LoRA - 1.
- ``--budget-s``: rows (or their later rounds) whose estimate does not fit are not run and are listed
  under ``skipped`` (model_budget docstring).
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # --budget-s counts from here (the interpreter's start is not measurable in-process)

import argparse  # noqa: E402
import ast  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when imported by a test

import model_comfy as mc  # noqa: E402
import model_report as mr  # noqa: E402
from model_formats import COMPILE_DEFAULT, EXTRA_FORMATS, default_formats, plan_fields, split_knob  # noqa: E402
from model_runner import Runner  # noqa: E402
from model_zoo import PRESET, WAN_480P_81F_TOKENS, flux_case, wan_case, wan_latent  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("HYBRIDQUANT_COMFYUI", str(REPO / ".comfyui" / "ComfyUI")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny widths, depth 1, 64 image tokens (smoke test)")
    ap.add_argument("--models", default="flux,wan")
    ap.add_argument("--eager-models", default=None, help="models whose eager rows are timed (default: --models)")
    ap.add_argument("--formats", default=None, help="comma list (default: every registry format + "
                    f"{', '.join(EXTRA_FORMATS)}, the speed targets' formats first); BASE+svdR / BASE+hadamard")
    ap.add_argument("--sizes", default="512,1024,1536", help="Flux image sides in pixels")
    ap.add_argument("--depth", nargs=2, type=int, default=None, metavar=("DOUBLE", "SINGLE"),
                    help="Flux blocks (default 5 10)")
    ap.add_argument("--full", action="store_true", help="full depth: Flux 19/38 blocks, Wan 40 layers")
    ap.add_argument("--wan-depth", type=int, default=None, help="Wan layers (default 4)")
    ap.add_argument("--wan-tokens", type=int, default=WAN_480P_81F_TOKENS,
                    help="video tokens (default 81 frames at 480x832)")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--key-prefix", default="", help="key prefix of the saved files ('' = diffusion_models "
                    "layout; 'model.diffusion_model.' = checkpoint layout)")
    ap.add_argument("--n", type=int, default=10, help="timed forwards per row per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per row")
    ap.add_argument("--host-samples", type=int, default=3)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock_fp8 rows")
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows (TorchCompileModel's wrapper)")
    ap.add_argument("--compile-models", default=None, help="models that get compile rows (default: --models)")
    ap.add_argument("--compile-formats", default=",".join(COMPILE_DEFAULT))
    ap.add_argument("--compile-sizes", default="1024", help="Flux sizes of the compile rows")
    ap.add_argument("--compile-backend", default="inductor", help="TorchCompileModel's backend (inductor, cudagraphs; "
                    "eager/aot_eager to check the mechanism)")
    ap.add_argument("--lora", action="store_true", help="add rank --lora-rank LoRA rows")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--lora-formats", default="all")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="keep the whole run under this many seconds: rows that would not fit are skipped and listed")
    ap.add_argument("--work-dir", default=str(REPO / ".cache" / "bench_model"))
    ap.add_argument("--keep-files", action="store_true", help="keep converted files (reused by later runs)")
    ap.add_argument("--knob", action="append", default=[], metavar="NAME=MODULE.ATTR=VALUE",
                    help="a pack constant (hybridquant.ops.MODULE.ATTR, a Python literal VALUE) set only while "
                         "the rows named FMT@NAME run: an A/B of a dispatch switch in one process, "
                         "e.g. --knob tri=linear_paths.FP8_ROWWISE_TRITON=True --formats F,F@tri "
                         "(a NAME given again sets several constants)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    a = ap.parse_args(argv)
    if a.repeats < 1 or a.n < 1 or a.warmup < 0 or a.host_samples < 1:
        ap.error("--repeats, --n and --host-samples must be >= 1, --warmup >= 0")
    if a.budget_s is not None and a.budget_s <= 0:
        ap.error("--budget-s must be > 0")
    a.model_list = [m for m in a.models.split(",") if m]
    for m in a.model_list:
        if m not in PRESET:
            ap.error(f"--models: unknown model {m!r} ({', '.join(PRESET)})")
    a.eager_set = set(a.model_list if a.eager_models is None else a.eager_models.split(","))
    a.compile_set = set(a.model_list if a.compile_models is None else a.compile_models.split(","))
    a.compile_formats = set(a.compile_formats.split(","))
    a.compile_sizes = [int(s) for s in a.compile_sizes.split(",") if s]
    lf = None if a.lora_formats == "all" else set(a.lora_formats.split(","))
    a.lora_formats_for = lambda fmt: {fmt} if lf is None or fmt in lf else set()
    if a.tiny:
        a.text_tokens = min(a.text_tokens, 16)
    a.knob_specs = {}
    for spec in a.knob:
        name, _, rest = spec.partition("=")
        target, _, value = rest.partition("=")
        mod_name, _, attr = target.rpartition(".")
        if not (name and mod_name and attr and value):
            ap.error(f"--knob {spec!r}: expected NAME=MODULE.ATTR=VALUE")
        try:
            a.knob_specs.setdefault(name, []).append((mod_name, attr, ast.literal_eval(value)))
        except (ValueError, SyntaxError) as e:
            ap.error(f"--knob {spec!r}: VALUE must be a Python literal ({type(e).__name__}: {e})")
    return a


def resolve_knobs(specs: dict) -> dict:
    """NAME -> [(module, attribute, value), ...] (a NAME given several times sets all of them), once
    ComfyUI is importable (the pack's ops import it)."""
    out = {}
    for name, items in specs.items():
        for mod_name, attr, value in items:
            try:
                module = importlib.import_module(f"hybridquant.ops.{mod_name}")
            except ImportError as e:
                raise SystemExit(f"--knob {name}: no module hybridquant.ops.{mod_name} ({e})") from e
            if not hasattr(module, attr):
                raise SystemExit(f"--knob {name}: hybridquant.ops.{mod_name} has no {attr}")
            out.setdefault(name, []).append((module, attr, value))
    return out


def main(argv=None):
    if (argv if argv is not None else sys.argv[1:])[:1] == ["--merge"]:
        ap = argparse.ArgumentParser(prog="bench_model.py --merge")
        ap.add_argument("--merge", nargs="+", required=True)
        ap.add_argument("--json")
        ap.add_argument("--md")
        m = ap.parse_args(argv)
        return mr.merge(m.merge, m.json, m.md)
    a = parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --tiny for the smoke run)")
    formats = a.formats.split(",") if a.formats else default_formats()
    for m in a.model_list:
        for f in formats:
            plan_fields(f, m)  # unknown names fail before any work
    for f in formats:
        knob = split_knob(f)[1]
        if knob is not None and knob not in a.knob_specs:
            raise SystemExit(f"--formats {f!r}: no --knob named {knob!r}")
        if knob is not None and split_knob(f)[0] in ("bf16", "stock_fp8"):
            raise SystemExit(f"--formats {f!r}: the reference rows (bf16, stock_fp8) take no knob")
    version = mc.import_comfy(a.comfy, cpu=dev.type == "cpu")
    a.knobs = resolve_knobs(a.knob_specs)
    if a.compile:  # every compiled variant x size is one cache entry of the same forward code
        dynamo_config = importlib.import_module("torch._dynamo").config
        for k in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(dynamo_config, k):
                setattr(dynamo_config, k, max(getattr(dynamo_config, k), 256))
    r = Runner(a, dev, version, t0=T0)
    command = "python bench/bench_model.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def result(partial: bool) -> dict:
        rows = r.row_dicts()
        mr.add_ratios(rows)
        return {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                "commit": mr.commit(), "comfyui": version, "repeats": a.repeats, "rows": rows,
                "skipped": r.budget.skipped, "notes": r.notes, "elapsed_s": round(time.monotonic() - T0, 1),
                "budget_s": a.budget_s, "command": command, **({"partial": True} if partial else {})}

    # A run killed by its device call's time limit still leaves the rows measured so far.
    r.on_progress = (lambda: mr.write(result(True), command, a.json, a.md)) if (a.json or a.md) else None
    for m in a.model_list:
        if m == "flux":
            case = flux_case(a.tiny, a.depth, a.full, a.key_prefix)
            sizes = [128] if a.tiny else [int(x) for x in a.sizes.split(",") if x]
        else:
            try:
                import comfy.ldm.wan.model  # noqa: F401
            except ImportError as e:
                r.notes.append(f"wan skipped: this ComfyUI tree has no comfy.ldm.wan.model ({e})")
                continue
            case = wan_case(a.tiny, a.wan_depth, a.full, a.key_prefix)
            sizes = [(2, 8, 8)] if a.tiny else [wan_latent(a.wan_tokens)]
        r.run_model(case, sizes, formats, eager=m in a.eager_set, compile_=a.compile and m in a.compile_set)
    final = result(False)
    print(mr.write(final, command, a.json, a.md))
    return final


if __name__ == "__main__":
    main()
