"""bench/bench_model.py end to end on CPU (--tiny): real ComfyUI Flux/Wan classes, conversion, the pack's
loaders, stock rows, LoRA rows, interleaved rounds and the JSON shape the lead's GPU runs are read with;
the --budget-s bookkeeping with stand-in rows; bench/readme_table.py on the committed H200 results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import model_budget  # noqa: E402
import model_runner  # noqa: E402
import readme_table  # noqa: E402
from model_zoo import ModelCase  # noqa: E402

ROW_KEYS = {"model", "format", "size", "compile", "ms", "bf16_ms", "speed_vs_bf16", "speed_vs_stock_fp8",
            "gpu_only_ms", "host_ms", "peak_vram_gb", "rel_err", "ms_min", "ms_max", "repeats"}


def run_bench(comfyui_path, tmp_path, *args):
    out = tmp_path / "bm.json"
    md = tmp_path / "bm.md"
    # One thread: on a busy 2-core machine torch's default thread pool makes each tiny matmul ~10x slower.
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / ".pyroot"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(REPO / "bench" / "bench_model.py"), "--device", "cpu", "--tiny", "--comfy",
           str(comfyui_path), "--n", "1", "--warmup", "0", "--work-dir", str(tmp_path / "work"),
           "--json", str(out), "--md", str(md), *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text()


@pytest.mark.comfyui
@pytest.mark.slow
def test_bench_model_tiny_cpu(comfyui_path, tmp_path):
    res, md = run_bench(comfyui_path, tmp_path, "--formats", "float8_e4m3fn,bnb_nf4", "--repeats", "2",
                        "--lora", "--lora-formats", "bf16,bnb_nf4")
    assert {"device", "torch", "commit", "rows", "skipped"} <= set(res) and res["device"] == "cpu"
    assert res["skipped"] == []  # no --budget-s: nothing is skipped
    rows = res["rows"]
    for r in rows:
        assert ROW_KEYS <= set(r), (r, ROW_KEYS - set(r))
        assert r["model"] in ("flux", "wan") and isinstance(r["compile"], bool)
        assert "error" not in r and "unsupported" not in r, r
        assert r["repeats"] == 2 and r["ms_min"] <= r["ms"] <= r["ms_max"], r
    got = {(r["model"], r["format"], r.get("lora", False)) for r in rows}
    for m in ("flux", "wan"):
        for f in ("bf16", "stock_fp8", "float8_e4m3fn", "bnb_nf4"):
            assert (m, f, False) in got
        assert (m, "bnb_nf4", True) in got and (m, "bf16", True) in got
    for r in rows:
        assert r["ms"] > 0 and r["bf16_ms"] > 0
        if r["format"] == "bf16":
            assert r["rel_err"] == 0.0
        else:  # the pack's formats and stock FP8 (diffusion_models layout: scales applied) are close to bf16
            assert 0 < r["rel_err"] < 0.05, r
        if r["format"] == "stock_fp8":
            assert any(k.endswith(":QuantizedTensor") for k in r["paths"]), r["paths"]
            assert r["speed_vs_stock_fp8"] == 1.0
        elif r["format"] != "bf16":
            assert any(k.startswith(r["format"]) for k in r["paths"]), r["paths"]
        if r.get("lora"):
            assert r["lora_overhead"] is not None
    assert "| model | depth | format |" in md
    # Split runs join into one file: rows concatenated and tagged with their run.
    import model_report

    out = tmp_path / "bm.json"
    model_report.merge([out, out], tmp_path / "all.json", tmp_path / "all.md")
    merged = json.loads((tmp_path / "all.json").read_text())
    assert len(merged["rows"]) == 2 * len(rows) and {r["run"] for r in merged["rows"]} == {0, 1}


@pytest.mark.comfyui
@pytest.mark.slow
def test_stock_row_is_right_or_unsupported_on_checkpoint_layout(comfyui_path, tmp_path):
    """A key-prefixed (checkpoint layout) FP8 file: 0.3.75's stock loader ignores its scales, so the row
    must say unsupported and carry no time; a core that reads it must give a close output."""
    res, md = run_bench(comfyui_path, tmp_path, "--models", "flux", "--formats", "float8_e4m3fn", "--repeats", "1",
                        "--key-prefix", "model.diffusion_model.")
    stock = [r for r in res["rows"] if r["format"] == "stock_fp8"]
    assert len(stock) == 1
    s = stock[0]
    if res["comfyui"] == "0.3.75":
        assert "unsupported" in s and "0 of the file's" in s["unsupported"], s
    if "unsupported" in s:
        assert s["ms"] is None and s["speed_vs_bf16"] is None and s["repeats"] == 0
        assert "unsupported:" in md
        fp8 = next(r for r in res["rows"] if r["format"] == "float8_e4m3fn")
        assert fp8["speed_vs_stock_fp8"] is None  # no ratio against a row without a valid time
    else:
        assert s["rel_err"] < 0.05 and s["ms"] > 0, s


@pytest.mark.comfyui
def test_seeded_file_has_every_weight_on_a_dynamic_vram_core(comfy, monkeypatch):
    """With aimdo on, a current core builds its Linear layers weightless until a state dict loads: the
    seeded file must still hold every Linear weight (else ComfyUI cannot detect it: the H200 run of
    bench_dynamic_vram.py failed so)."""
    import importlib

    try:
        cmm = importlib.import_module("comfy.memory_management")
    except ImportError:
        pytest.skip("this core has no dynamic VRAM (comfy.memory_management)")
    if not hasattr(cmm, "aimdo_enabled"):
        pytest.skip("this core has no dynamic VRAM (aimdo_enabled)")
    from model_zoo import FLUX_TINY, seeded_state_dict

    monkeypatch.setattr(cmm, "aimdo_enabled", True)
    sd = seeded_state_dict(ModelCase("flux", dict(FLUX_TINY)), "cpu")
    assert "img_in.weight" in sd and "double_blocks.0.img_attn.qkv.weight" in sd
    assert cmm.aimdo_enabled is True  # the build restores the core's setting


# ---- --budget-s bookkeeping, without ComfyUI ----------------------------------------------------------
def test_budget_reserves_and_estimates():
    b = model_budget.Budget(10.0, reserve_s=0.0, device_type="cpu")
    assert b.fits(5.0)
    b.commit(6.0)
    assert not b.fits(5.0) and b.fits(3.0)
    b.release(6.0)
    assert b.fits(5.0)
    guess = b.setup_estimate(1.0, None, convert=True, compile_=False)
    assert guess == model_budget.GUESS_CONVERT_S_PER_GB["cpu"] + model_budget.GUESS_LOAD_S_PER_GB["cpu"]
    b.saw_convert(2.0, 1.0)
    b.saw_load(0.5, 1.0)
    assert b.setup_estimate(2.0, 1.0, convert=True, compile_=False) == pytest.approx(4.5)
    b.skip("row", 7.0, model="flux", format="bnb_nf4", size=1024)
    assert b.skipped[0]["format"] == "bnb_nf4" and "needs ~7.0 s" in b.skipped[0]["reason"]
    assert model_budget.Budget(None).fits(1e9)


def _stub_row(case, fmt, sleep_s):
    patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Module()))
    v = model_runner.Variant(case, fmt, stock=fmt == "bf16", patcher=patcher)

    def fwd():
        time.sleep(sleep_s)
        return torch.ones(4)

    return model_runner.Row(v, 64, fwd, 16)


def test_runner_skips_rows_and_rounds_that_do_not_fit():
    args = types.SimpleNamespace(budget_s=3.0, n=2, warmup=0, no_graph=True, host_samples=1, repeats=3,
                                 text_tokens=4)
    r = model_runner.Runner(args, torch.device("cpu"), "test")
    r.budget = model_budget.Budget(3.0, reserve_s=0.0, device_type="cpu")
    case = ModelCase("flux", {"depth": 1, "depth_single_blocks": 1})
    fast, slow = _stub_row(case, "bf16", 0.01), _stub_row(case, "float8_e4m3fn", 0.4)
    r.first_round(fast)  # ~3 x 0.03 s: fits
    r.first_round(slow)  # 3 rounds x 3 forwards x 0.4 s > what is left after its probe: skipped, listed
    assert len(fast.rounds) == 1 and fast.reserved > 0
    assert slow.done and slow.info.get("skipped") and not slow.rounds
    assert [s["format"] for s in r.budget.skipped] == ["float8_e4m3fn"] and r.budget.skipped[0]["what"] == "row"
    r.later_round(fast, 1)
    assert len(fast.rounds) == 2
    r.budget.limit = r.budget.elapsed() + r.budget.committed + fast.round_s / 10  # round 3 no longer fits
    r.later_round(fast, 2)
    assert len(fast.rounds) == 2 and fast.done and fast.reserved == 0.0
    assert r.budget.skipped[-1]["what"] == "round 3" and "budget_note" in fast.info
    r.rows += [fast, slow]  # what run_model collects; the skipped row is in the budget's list only
    rows = r.row_dicts()
    assert [d["format"] for d in rows] == ["bf16"] and rows[0]["repeats"] == 2
    assert rows[0]["ms_min"] <= rows[0]["ms"] <= rows[0]["ms_max"]


# ---- README table -------------------------------------------------------------------------------------
def _ms_cell(r):
    cell = f"{r['ms']:.1f}"
    if (r.get("repeats") or 1) > 1 and r.get("ms_min") is not None:
        cell += f" ({r['ms_min']:.1f}–{r['ms_max']:.1f})"
    return cell


def test_readme_table_renders_committed_results():
    res = json.loads((REPO / "bench" / "RESULTS_H200.json").read_text())
    table = readme_table.render(res)
    lines = table.splitlines()
    assert lines[0].startswith(readme_table.BEGIN) and lines[-1] == readme_table.END
    assert res["device"] in table and res["commit"] in table
    body = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| format")]
    rows, _ = readme_table.pick_rows(res, "flux", 1024, None)
    bf16 = next(r for r in rows if r["format"] == "bf16")
    assert body[0] == (f"| bf16 | {_ms_cell(bf16)} | 1.00× | {bf16['gpu_only_ms']:.1f} | "
                       f"{bf16['peak_vram_gb']:.2f} | {bf16['weights_gb']:.2f} |")
    fp8 = next(r for r in rows if r["format"] == "float8_e4m3fn")
    assert f"| FP8 (`float8_e4m3fn`) | {_ms_cell(fp8)} | {fp8['speed_vs_bf16']:.2f}× |" in table
    # a stock row whose output is far from bf16 (0.3.75 with checkpoint-prefixed files) gets no time
    stock = next(r for r in rows if r["format"] == "stock_fp8")
    stock_line = next(ln for ln in body if ln.startswith("| stock ComfyUI FP8"))
    far = stock.get("rel_err") is not None and stock["rel_err"] > readme_table.MAX_REL_ERR
    assert ("no valid time" in stock_line) == bool(far or stock.get("unsupported"))
    assert len(body) == len(rows)


def test_readme_table_all_runs_of_a_merged_file():
    """--all-runs: each format once, from the first run that has it, its commit in the run column and
    its ratio against its own run's bf16 row."""
    res = json.loads((REPO / "bench" / "RESULTS_H200.json").read_text())
    table = readme_table.render(res, all_runs=True)
    rows, _ = readme_table.pick_rows(res, "flux", 1024, None, all_runs=True)
    formats = [r["format"] for r in rows]
    assert len(formats) == len(set(formats)) and formats[0] == "bf16"
    body = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| format")]
    assert len(body) == len(rows)
    for r, line in zip(rows, body, strict=True):
        assert line.endswith(f" {readme_table._run_commit(res, r)} |")
        if r.get("speed_vs_bf16") is not None and not r.get("unsupported"):
            base = next(b for b in res["rows"] if b["format"] == "bf16" and b.get("run") == r.get("run")
                        and b["size"] == r["size"] and not b.get("compile") and not b.get("lora"))
            assert abs(r["speed_vs_bf16"] - base["ms"] / r["ms"]) < 0.01


def test_readme_table_is_the_generated_one():
    assert readme_table.main(["--check", str(REPO / "README.md"), "--run", "0"]) == 0


def test_readme_table_check_fails_on_a_hand_edit(tmp_path):
    text = (REPO / "README.md").read_text()
    start = text.index(readme_table.BEGIN)
    row = text.index("| bf16 | ", start)
    text = text[:row] + "| bf16 | 1" + text[row + len("| bf16 | "):]  # a hand edit inside the block
    (tmp_path / "README.md").write_text(text)
    assert readme_table.main(["--check", str(tmp_path / "README.md"), "--run", "0"]) == 1


@pytest.mark.comfyui
def test_knob_rows_set_the_constant_only_while_they_run(comfy):
    """``--knob NAME=MODULE.ATTR=VALUE`` + a ``FMT@NAME`` row: the row loads FMT's file, and the pack
    constant holds VALUE only during that row's forwards (an A/B of a dispatch switch in one process)."""
    import bench_model
    from model_formats import plan_fields, split_knob

    from hybridquant.ops import linear_paths

    a = bench_model.parse_args(["--device", "cpu", "--tiny", "--knob", "tri=linear_paths.FP8_ROWWISE_TRITON=True",
                                "--knob", "tri=linear_paths.FP8_AS_ROWWISE_MIN_ROWS=17",
                                "--formats", "float8_e4m3fn_rowwise,float8_e4m3fn_rowwise@tri"])
    assert a.knob_specs == {"tri": [("linear_paths", "FP8_ROWWISE_TRITON", True),
                                    ("linear_paths", "FP8_AS_ROWWISE_MIN_ROWS", 17)]}
    a.knobs = bench_model.resolve_knobs(a.knob_specs)
    assert split_knob("float8_e4m3fn_rowwise@tri") == ("float8_e4m3fn_rowwise", "tri")
    assert plan_fields("float8_e4m3fn_rowwise@tri", "flux") == plan_fields("float8_e4m3fn_rowwise", "flux")
    assert model_runner.Runner.file_name("float8_e4m3fn_rowwise@tri") == model_runner.Runner.file_name(
        "float8_e4m3fn_rowwise")
    seen = []
    model = types.SimpleNamespace(apply_model=lambda *x, **kw: seen.append(
        (linear_paths.FP8_ROWWISE_TRITON, linear_paths.FP8_AS_ROWWISE_MIN_ROWS)))
    r = model_runner.Runner(a, torch.device("cpu"), "test")
    case = ModelCase("flux", {"depth": 1, "depth_single_blocks": 1, "hidden_size": 64, "num_heads": 2,
                              "in_channels": 16, "vec_in_dim": 32, "context_in_dim": 32, "axes_dim": [8, 12, 12]})
    before = (linear_paths.FP8_ROWWISE_TRITON, linear_paths.FP8_AS_ROWWISE_MIN_ROWS)
    for fmt in ("float8_e4m3fn_rowwise@tri", "float8_e4m3fn_rowwise"):
        v = model_runner.Variant(case, fmt, stock=False, patcher=types.SimpleNamespace(model=model, wrappers={}))
        r.make_row(v, 128).fwd()
    assert seen == [(True, 17), before]
    assert (linear_paths.FP8_ROWWISE_TRITON, linear_paths.FP8_AS_ROWWISE_MIN_ROWS) == before
    with pytest.raises(SystemExit):
        bench_model.parse_args(["--knob", "tri=FP8_ROWWISE_TRITON"])  # no VALUE
    with pytest.raises(SystemExit):
        bench_model.resolve_knobs({"x": [("linear_paths", "NO_SUCH_CONSTANT", 1)]})
