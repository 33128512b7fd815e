"""The architecture matrix as a table: architecture x format -> detect / load / forward rel err.

The same rows as tests/test_arch_matrix.py (builders: tests/arch_models.py, row logic: tests/arch_rows.py): ComfyUI's
own model classes at released widths (depth 1-2), converted by the pack through each preset, stock
detection of the stored shapes, loaded through the pack's loader and (for the core's own format
names) the stock loader, one CPU forward compared to the bf16 file's.

    PYTHONPATH=.pyroot .venv/bin/python bench/arch_matrix.py [--comfy TREE] [--md FILE]
        [--archs flux1,wan,...] [--formats float8_e4m3fn,nvfp4,...]

``--comfy`` defaults to $HYBRIDQUANT_COMFYUI, else .comfyui/ComfyUI (0.3.75). Run it with the tree's
own venv (e.g. /work/comfy-current/venv/bin/python for 0.33). Every architecture and format by default
(``--archs``/``--formats`` narrow it); heavy variants included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def import_comfy(root: str) -> str:
    if not (Path(root) / "comfy" / "ops.py").is_file():
        raise SystemExit(f"--comfy: no ComfyUI tree at {root}")
    sys.path.insert(0, root)
    saved, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401
    finally:
        sys.argv = saved
    import comfyui_version

    return comfyui_version.__version__


def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _err(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def cell(row) -> str:
    """Compact cell: pack rel err (stock rel err), ✗ marks a failed check."""
    bad = row.detect != "same" or row.pack != "ok" or (row.pack_err or 0) > row.tol or row.quantized == 0
    stock = ""
    if row.stock == "ok":
        stock = f" ({_err(row.stock_err)}{' ✗' if row.stock_err > row.tol else ''})"
    elif row.stock.startswith("error"):
        stock = " (stock ✗)"
    return ("✗ " if bad else "") + _err(row.pack_err) + stock


def markdown(version, root, rows, skipped, fmts, command, seconds, rev) -> str:
    archs = []
    for r in rows:
        if (r.arch, r.variant) not in archs:
            archs.append((r.arch, r.variant))
    out = [f"### ComfyUI {version} ({root})", "",
           f"Command: `{command}`  ", f"Commit: {rev} (at the start); {seconds:.0f} s on this machine (CPU).", "",
           "Cell: relative L2 error of the forward vs the bf16 file, pack loader (stock loader where the core "
           "names the format); ✗ = a check failed (see the detail table). `n/c` = not in this core.", "",
           "| architecture | " + " | ".join(f"`{f}`" for f in fmts) + " |",
           "|---|" + "---|" * len(fmts)]
    by = {(r.arch, r.fmt): r for r in rows}
    for arch, variant in archs:
        out.append(f"| {arch} ({variant}) | " + " | ".join(cell(by[arch, f]) if (arch, f) in by else "–" for f in fmts)
                   + " |")
    for arch, why in skipped:
        out.append(f"| {arch} | n/c: {why} |" + " |" * (len(fmts) - 1))
    out += ["", "<details><summary>detail: detect / load / forward per row</summary>", "",
            "| architecture | format | quantized layers | kept (detection-safe) | detect | pack load | pack err "
            "| stock load | stock err | tolerance | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.arch} | `{r.fmt}` | {r.quantized} | {len(r.kept_detection)} | {r.detect} | {r.pack} | "
                   f"{_err(r.pack_err)} | {r.stock} | {_err(r.stock_err)} | {r.tol} | {r.seconds:.0f} |")
    out += ["", "</details>", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfy", default=os.environ.get("HYBRIDQUANT_COMFYUI", str(REPO / ".comfyui" / "ComfyUI")))
    ap.add_argument("--md", help="write the markdown table to this file")
    ap.add_argument("--archs", help="comma-separated builders (default: all)")
    ap.add_argument("--formats", help="comma-separated format names (default: every format)")
    a = ap.parse_args(argv)
    version = import_comfy(a.comfy)
    import arch_rows as am

    archs = a.archs.split(",") if a.archs else list(am.BUILDERS)
    fmts = a.formats.split(",") if a.formats else list(am.formats())
    for n in archs:
        if n not in am.BUILDERS:
            raise SystemExit(f"--archs: unknown {n!r}; known: {', '.join(am.BUILDERS)}")
    for f in fmts:
        if f not in am.formats():
            raise SystemExit(f"--formats: unknown {f!r}; known: {', '.join(am.formats())}")
    t0, rev = time.monotonic(), commit()
    rows, skipped = [], []
    work = Path(tempfile.mkdtemp(prefix="arch_matrix_"))
    try:
        for n in archs:
            arch, why = am.select(n)
            if arch is None:
                skipped.append((n, why))
                print(f"{n}: {why}", flush=True)
                continue
            d = work / n
            d.mkdir()
            src = am.make_matrix_source(arch, d)
            for f in fmts:
                row = am.run_row(src, f)
                src.drop(f)
                rows.append(row)
                print(f"{n:8} {f:24} q={row.quantized:3} detect={row.detect} pack={row.pack} {_err(row.pack_err)} "
                      f"stock={row.stock} {_err(row.stock_err)} tol={row.tol} {row.seconds:.0f}s", flush=True)
            shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python bench/arch_matrix.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = markdown(version, a.comfy, rows, skipped, fmts, command.strip(), time.monotonic() - t0, rev)
    print(md)
    if a.md:
        Path(a.md).write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
