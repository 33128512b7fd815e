"""The README's whole-model speed table, generated from a committed bench_model.py JSON.

    python bench/readme_table.py                       # print it (bench/RESULTS_H200.json, flux, 1024)
    python bench/readme_table.py --write README.md     # replace the block between the markers
    python bench/readme_table.py --check README.md     # exit 1 if README's block is not what the JSON gives

One model, one size, eager, no LoRA, from one run of the file (a merged file holds several: the first run
with a bf16 row for that model and size, or ``--run``), so every ratio is against the bf16 row of the
same process. ``--all-runs``: every run of a merged file, each format from the first run that has it,
with a ``run`` column (its commit); each ratio stays against the bf16 row of its own run. A row whose
output is far from bf16 (rel. err > 0.1, e.g. stock FP8 on a core that ignored the file's scales) or
that the core does not support gets no time, only the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "RESULTS_H200.json"
BEGIN, END = "<!-- readme_table:begin", "<!-- readme_table:end -->"
MAX_REL_ERR = 0.1
LABELS = {
    "bf16": "bf16", "stock_fp8": "stock ComfyUI FP8", "float8_e4m3fn": "FP8 (`float8_e4m3fn`)",
    "hybrid_mxfp8": "Hybrid MXFP8", "mxfp8": "MXFP8", "float8_e4m3fn_rowwise": "FP8 per-row",
    "float8_e4m3fn_blockwise": "FP8 blockwise", "int8_tensorwise": "INT8 tensorwise",
    "int8_tensorwise+row": "INT8 per-row", "int8_blockwise": "INT8 blockwise", "mixed_nf4_fp8": "mixed NF4 + FP8",
    "bnb_nf4": "NF4", "bnb_fp4": "FP4 (bitsandbytes)", "nvfp4": "NVFP4", "int5_groupwise": "INT5",
    "int6_groupwise": "INT6", "bnb_nf4+svd32": "NF4 + SVD rank 32", "bnb_nf4+hadamard": "NF4 + Hadamard",
    "convrot_w4a4": "ConvRot W4A4", "asym_w4a8_int8": "W4A8 INT8",
}


def _num(v, spec):
    return "–" if v is None else spec.format(v)


def pick_rows(result: dict, model: str, size, run=None, all_runs=False) -> tuple[list[dict], object]:
    rows = [r for r in result["rows"] if r["model"] == model and str(r["size"]) == str(size)
            and not r.get("compile") and not r.get("lora")]
    if all_runs:  # each format once, from the first run that has it; a later run's baselines are not repeated
        seen, out = set(), []
        for r in rows:
            if r["format"] not in seen:
                seen.add(r["format"])
                out.append(r)
        return out, None
    if run is None:
        bf16 = [r for r in rows if r["format"] == "bf16"]
        if not bf16:
            raise SystemExit(f"no eager bf16 row for {model} at size {size} in the JSON")
        run = bf16[0].get("run")
    return [r for r in rows if r.get("run") == run], run


def _run_commit(result: dict, r: dict) -> str:
    runs = result.get("runs") or []
    i = r.get("run")
    return runs[i]["commit"] if i is not None and i < len(runs) else result["commit"]


def render(result: dict, model="flux", size=1024, run=None, source="bench/RESULTS_H200.json",
           all_runs=False) -> str:
    rows, run = pick_rows(result, model, size, run, all_runs)
    depth = next((r.get("depth") for r in rows if r.get("depth")), None)
    args = (f"--json {source} --model {model} --size {size}" + ("" if run is None else f" --run {run}")
            + (" --all-runs" if all_runs else ""))
    where = f"{model}" + (f" ({depth} blocks)" if depth and model == "flux" else f" ({depth} layers)" if depth else "")
    repeats = max((r.get("repeats") or 1) for r in rows)
    commits = sorted({_run_commit(result, r) for r in rows}) if all_runs else [result["commit"]]
    lines = [f"{BEGIN} python bench/readme_table.py {args} -->",
             f"{result['device']}, torch {result['torch']}, ComfyUI {result.get('comfyui')}, commit "
             f"{', '.join(commits)}: {where}, size {size}, eager, one forward"
             + (f", median of up to {repeats} interleaved rounds (min–max)" if repeats > 1 else "") + "."
             + (" Each ratio is against the bf16 row of the same run (process)." if all_runs else ""), "",
             "| format | step ms | vs bf16 | GPU-only (CUDA graph) ms | peak VRAM GB | weights GB |"
             + (" run |" if all_runs else ""),
             "|---|---|---|---|---|---|" + ("---|" if all_runs else "")]
    for r in rows:
        label = LABELS.get(r["format"], f"`{r['format']}`")
        run_cell = f" {_run_commit(result, r)} |" if all_runs else ""
        why = r.get("unsupported") or r.get("error")
        if not why and r.get("rel_err") is not None and r["rel_err"] > MAX_REL_ERR:
            why = f"output far from bf16 (rel. err {r['rel_err']:.2f}): no valid time"
        if why or r.get("ms") is None:
            lines.append(f"| {label} | {why or 'not measured'} | – | – | – | {_num(r.get('weights_gb'), '{:.2f}')} |"
                         + run_cell)
            continue
        ms = f"{r['ms']:.1f}"
        if (r.get("repeats") or 1) > 1 and r.get("ms_min") is not None:
            ms += f" ({r['ms_min']:.1f}–{r['ms_max']:.1f})"
        lines.append(f"| {label} | {ms} | {_num(r.get('speed_vs_bf16'), '{:.2f}×')} | "
                     f"{_num(r.get('gpu_only_ms'), '{:.1f}')} | {_num(r.get('peak_vram_gb'), '{:.2f}')} | "
                     f"{_num(r.get('weights_gb'), '{:.2f}')} |" + run_cell)
    lines.append(END)
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    start = text.find(BEGIN)
    end = text.find(END, start)
    if start < 0 or end < 0:
        raise SystemExit(f"no '{BEGIN} ... {END}' block in the README")
    return text[:start] + block.rstrip("\n") + text[end + len(END):]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    ap.add_argument("--model", default="flux")
    ap.add_argument("--size", default="1024")
    ap.add_argument("--run", type=int, default=None)
    ap.add_argument("--all-runs", action="store_true", help="every run of a merged file (a run column)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", metavar="README")
    g.add_argument("--check", metavar="README")
    a = ap.parse_args(argv)
    path = Path(a.json)
    try:
        source = path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        source = a.json
    block = render(json.loads(path.read_text()), a.model, a.size, a.run, source, a.all_runs)
    target = a.write or a.check
    if target is None:
        sys.stdout.write(block)
        return 0
    text = Path(target).read_text()
    new = replace_block(text, block)
    if a.write:
        Path(target).write_text(new)
        return 0
    if new != text:
        print(f"{target}: the speed table is not what {source} gives; run: python bench/readme_table.py "
              f"--write {target}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
