"""bench/bench_model.py end to end on CPU (--tiny): real ComfyUI Flux/Wan classes, conversion, the pack's
loaders, stock rows, LoRA rows and the JSON shape the lead's GPU runs are read with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {"model", "format", "size", "compile", "ms", "bf16_ms", "speed_vs_bf16", "speed_vs_stock_fp8",
            "gpu_only_ms", "host_ms", "peak_vram_gb", "rel_err"}


@pytest.mark.comfyui
@pytest.mark.slow
def test_bench_model_tiny_cpu(comfyui_path, tmp_path):
    out = tmp_path / "bm.json"
    md = tmp_path / "bm.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / ".pyroot"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(REPO / "bench" / "bench_model.py"), "--device", "cpu", "--tiny", "--comfy",
           str(comfyui_path), "--formats", "float8_e4m3fn,int8_tensorwise+row,bnb_nf4",
           "--lora", "--lora-formats", "bf16,bnb_nf4", "--n", "2", "--warmup", "1",
           "--work-dir", str(tmp_path / "work"), "--json", str(out), "--md", str(md)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"device", "torch", "commit", "rows"} <= set(res) and res["device"] == "cpu"
    rows = res["rows"]
    for r in rows:
        assert ROW_KEYS <= set(r), (r, ROW_KEYS - set(r))
        assert r["model"] in ("flux", "wan") and isinstance(r["compile"], bool)
        assert "error" not in r, r
    got = {(r["model"], r["format"], r.get("lora", False)) for r in rows}
    for m in ("flux", "wan"):
        for f in ("bf16", "stock_fp8", "float8_e4m3fn", "int8_tensorwise+row", "bnb_nf4"):
            assert (m, f, False) in got
        assert (m, "bnb_nf4", True) in got and (m, "bf16", True) in got
    for r in rows:
        assert r["ms"] > 0 and r["bf16_ms"] > 0
        if r["format"] == "bf16":
            assert r["rel_err"] == 0.0
        elif r["format"] != "stock_fp8":  # the pack's formats are close to bf16 on the seeded model
            assert 0 < r["rel_err"] < 0.05, r
            assert any(k.startswith(r["format"].split("+")[0] if r["format"] != "mixed_nf4_fp8" else "bnb_nf4")
                       for k in r["paths"]), r["paths"]
        if r.get("lora"):
            assert r["lora_overhead"] is not None
    assert "| model | format |" in md.read_text()
    # Split runs join into one file: rows concatenated and tagged with their run.
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_model", REPO / "bench" / "bench_model.py")
    bm = importlib.util.module_from_spec(spec)
    sys.modules["bench_model"] = bm  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(bm)
    finally:
        sys.modules.pop("bench_model", None)
    bm.merge([out, out], tmp_path / "all.json", tmp_path / "all.md")
    merged = json.loads((tmp_path / "all.json").read_text())
    assert len(merged["rows"]) == 2 * len(rows) and {r["run"] for r in merged["rows"]} == {0, 1}
