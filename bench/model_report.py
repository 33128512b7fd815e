"""Output of the whole-model benchmark: ratios between rows of one process, the JSON in issue 11's shape
(plus ``ms_min``/``ms_max``/``repeats``), a markdown table, and ``--merge`` of split runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _key(r, fmt, lora=False):
    return (r["model"], str(r["size"]), r["compile"], fmt, lora, r.get("run"))


def add_ratios(rows) -> None:
    """bf16_ms / stock_fp8_ms / speed ratios per row, against the rows of the same model, size, eager or
    compile, LoRA or not (and run, in a merged file); None where a side has no time."""
    by = {_key(r, r["format"], r.get("lora", False)): r for r in rows}
    for r in rows:
        b = by.get(_key(r, "bf16", r.get("lora", False)))
        s = by.get(_key(r, "stock_fp8", r.get("lora", False)))
        r["bf16_ms"] = b.get("ms") if b else None
        r["stock_fp8_ms"] = s.get("ms") if s else None
        ms = r.get("ms")
        r["speed_vs_bf16"] = round(r["bf16_ms"] / ms, 4) if ms and r["bf16_ms"] else None
        r["speed_vs_stock_fp8"] = round(r["stock_fp8_ms"] / ms, 4) if ms and r["stock_fp8_ms"] else None
        for k in ("ms", "gpu_only_ms", "host_ms", "peak_vram_gb", "rel_err"):
            r.setdefault(k, None)
        if r.get("lora"):
            base = by.get(_key(r, r["format"]))
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


def cell(v, spec="{:.2f}"):
    return "–" if v is None else spec.format(v)


def ms_cell(r):
    if r.get("ms") is None:
        return "–"
    if r.get("repeats", 1) > 1 and r.get("ms_min") is not None:
        return f"{r['ms']:.2f} ({r['ms_min']:.2f}–{r['ms_max']:.2f})"
    return f"{r['ms']:.2f}"


def markdown(result, command) -> str:
    lines = [f"# Whole-model benchmark ({result['device']})", "",
             f"Command: `{command}`  ", f"Commit {result['commit']}; torch {result['torch']}; "
             f"ComfyUI {result.get('comfyui')}. Ratios vs bf16 / stock ComfyUI FP8 measured in the same run "
             "(compile rows: vs compiled bf16/stock). ms: median of the rounds' medians (min–max over the "
             "interleaved rounds). Method: bench/bench_model.py docstring.", "",
             "| model | depth | format | size | compile | LoRA | ms (min–max) | vs bf16 | vs stock FP8 | GPU-only ms | "
             "host ms | peak VRAM GB | weights GB | rel err | paths |", "|---" * 15 + "|"]
    for r in result["rows"]:
        paths = ", ".join(f"{k}×{v}" for k, v in (r.get("paths") or {}).items())
        if r.get("unsupported"):
            paths = "unsupported: " + r["unsupported"]
        elif r.get("error"):
            paths = "error: " + r["error"][:120]
        elif r.get("graph_error") and r.get("gpu_only_ms") is None and result["device"] != "cpu":
            paths += f" (graph: {r['graph_error'][:60]})"
        if r.get("budget_note"):
            paths += f" ({r['budget_note']})"
        lora = ("yes" + (f" (+{100 * r['lora_overhead']:.0f}%)" if r.get("lora_overhead") is not None else "")
                if r.get("lora") else "")
        lines.append(f"| {r['model']} | {r.get('depth', '')} | {r['format']} | {r['size']} | "
                     f"{'yes' if r['compile'] else ''} | {lora} | {ms_cell(r)} | "
                     f"{cell(r.get('speed_vs_bf16'), '{:.2f}×')} | {cell(r.get('speed_vs_stock_fp8'), '{:.2f}×')} | "
                     f"{cell(r.get('gpu_only_ms'))} | {cell(r.get('host_ms'))} | {cell(r.get('peak_vram_gb'))} | "
                     f"{cell(r.get('weights_gb'))} | {cell(r.get('rel_err'), '{:.2e}')} | {paths} |")
    if result.get("partial"):
        lines.insert(2, "**Partial**: written while the run was going; it stopped before finishing (time limit?).  ")
    skipped = result.get("skipped") or []
    if skipped:
        lines += ["", "Skipped by `--budget-s` (estimate vs seconds left):", ""]
        lines += [f"- {s['model']} {s['format']} {s.get('size')} compile={s['compile']} lora={s['lora']}: "
                  f"{s['what']}, {s['reason']}" for s in skipped]
    lines += [""] + [f"- {n}" for n in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def write(result, command, json_out=None, md_out=None) -> str:
    md = markdown(result, command)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    if md_out:
        Path(md_out).write_text(md)
    return md


def merge(paths, json_out, md_out) -> dict:
    """One JSON/MD from several runs (e.g. a split across GPU calls): rows concatenated with ``run`` = the
    index of their file; each run's ratios stay against the baselines of its own process."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = [dict(r, run=i) for i, res in enumerate(runs) for r in res["rows"]]
    head = runs[0]
    result = {"device": head["device"], "torch": head["torch"], "commit": head["commit"],
              "comfyui": head.get("comfyui"), "rows": rows,
              "skipped": [dict(s, run=i) for i, res in enumerate(runs) for s in res.get("skipped", [])],
              "notes": [n for res in runs for n in res.get("notes", [])],
              "runs": [{"file": os.fspath(p), "commit": res["commit"], "command": res.get("command")}
                       for p, res in zip(paths, runs)]}
    command = "; ".join(res.get("command") or "?" for res in runs)
    print(write(result, command, json_out, md_out))
    return result
