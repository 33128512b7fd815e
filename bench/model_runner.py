"""The whole-model benchmark's run: every variant (format x eager/compile x LoRA) of a model is loaded once
and kept resident; rows (variant x size) are timed in ``repeats`` interleaved rounds — round r times
bf16, stock FP8 and every format in turn before round r+1 starts — so a drift of the host or the GPU
clock hits every row alike instead of whichever ran last. A row's ``ms`` is the median of its rounds'
medians, ``ms_min``/``ms_max`` their spread.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import model_comfy as mc
import model_timing as mt
import torch
from model_budget import Budget
from model_formats import plan_fields, split_knob
from model_zoo import PRESET, ModelCase, inputs, layer_shapes, lora_state_dict, save_source, size_label

STOCK_MAX_REL_ERR = 0.1  # a correct FP8 row is ~2e-3 from bf16; 0.35 is what ignored scales give


@dataclasses.dataclass
class Variant:
    case: ModelCase
    fmt: str  # "bf16", "stock_fp8" or a format row name
    stock: bool  # loaded by stock ComfyUI's loader
    compile: bool = False
    lora: bool = False
    timed: bool = True  # False: set up only for its clones (a compile-only model's eager variant)
    base: Variant | None = None  # the variant this one is a clone of (LoRA, compile)
    path: str | None = None
    patcher: object = None
    weights_gb: float | None = None
    convert_s: float | None = None
    unsupported: str | None = None
    error: str | None = None
    budget_skipped: bool = False

    def ident(self) -> dict:
        return {"model": self.case.kind, "format": self.fmt, "compile": self.compile, "lora": self.lora}


@dataclasses.dataclass
class Row:
    variant: Variant
    size: object
    fwd: object = None
    tokens: int | None = None
    rounds: list = dataclasses.field(default_factory=list)
    round_s: float = 0.0
    info: dict = dataclasses.field(default_factory=dict)
    rel_errs: list = dataclasses.field(default_factory=list)
    done: bool = False  # no further rounds (error, unsupported, budget)
    reserved: float = 0.0  # budget seconds held for this row's remaining rounds


class Runner:
    def __init__(self, args, device, version, t0=None):
        self.a, self.dev, self.cuda, self.version = args, device, device.type == "cuda", version
        self.budget = Budget(args.budget_s, t0, device.type)
        self.rows: list[Row] = []
        self.on_progress = None  # called after each variant's rows: main() writes the partial JSON/MD
        self.notes: list[str] = []
        self.refs: dict = {}

    @staticmethod
    def file_name(fmt: str) -> str:
        """The converted file of a row name (stock FP8 loads the pack's tensorwise FP8 file; a ``FMT@KNOB``
        row loads FMT's file)."""
        fmt = split_knob(fmt)[0]
        return ("float8_e4m3fn" if fmt == "stock_fp8" else fmt).replace("+", "_") + ".safetensors"

    # ---- setup -----------------------------------------------------------------------------------
    def variants(self, case, formats, eager: bool, compile_: bool) -> list[Variant]:
        a, out = self.a, []
        names = ["bf16"] + ([] if a.no_stock else ["stock_fp8"]) + list(formats)
        for fmt in names:
            v = Variant(case, fmt, stock=fmt in ("bf16", "stock_fp8"), timed=eager)
            out.append(v)
            if a.lora and a.lora_formats_for(fmt):
                out.append(Variant(case, fmt, v.stock, lora=True, base=v, timed=eager))
            if compile_ and fmt in a.compile_formats:
                out.append(Variant(case, fmt, v.stock, compile=True, base=v))
        return out

    def setup(self, v: Variant, work: Path, src: Path, lora_sd) -> None:
        """Convert (if needed) and load ``v``, or clone its base with LoRA / the compile wrapper."""
        if v.base is not None:
            if v.base.patcher is None or v.base.unsupported:
                v.unsupported = v.base.unsupported
                v.error = None if v.unsupported else (v.base.error or "its base variant was not loaded")
                return
            v.path, v.weights_gb, v.convert_s = v.base.path, v.base.weights_gb, v.base.convert_s
            if v.lora:
                import comfy.sd

                v.patcher, _ = comfy.sd.load_lora_for_models(v.base.patcher, None, lora_sd, 1.0, 0)
            else:
                from comfy_api.torch_helpers import set_torch_compile_wrapper

                v.patcher = v.base.patcher.clone()
                set_torch_compile_wrapper(model=v.patcher, backend=self.a.compile_backend)
            mc.activate(v.patcher)
            return
        if v.fmt == "bf16":
            path = src
        else:
            fmt = "float8_e4m3fn" if v.fmt == "stock_fp8" else split_knob(v.fmt)[0]
            path = work / self.file_name(v.fmt)
            if not path.exists():
                from hybridquant.converter import PlanOptions, convert_file

                t = time.monotonic()
                opts = PlanOptions(presets=(PRESET[v.case.kind],), **plan_fields(fmt, v.case.kind))
                convert_file(str(src), str(path), opts, device=str(self.dev), overwrite=True, error_stats=False)
                v.convert_s = round(time.monotonic() - t, 1)
                self.budget.saw_convert(v.convert_s, src.stat().st_size / 1e9)
        v.path, v.weights_gb = str(path), round(os.path.getsize(path) / 1e9, 3)
        t = time.monotonic()
        v.patcher = mc.load(v.path, v.stock)
        self.budget.saw_load(time.monotonic() - t, v.weights_gb)
        if v.fmt == "stock_fp8":
            v.unsupported = mc.stock_support(v.patcher, v.path, self.version)

    def make_row(self, v: Variant, size) -> Row:
        import comfy.patcher_extension as pe

        x, sigma, kw, tokens = inputs(v.case, size, self.dev, self.a.text_tokens)
        topts = {"wrappers": pe.copy_nested_dicts(v.patcher.wrappers)} if v.compile else {}
        base = v.patcher.model
        knob = self.a.knobs.get(split_knob(v.fmt)[1])  # (no knob: get(None) -> None)

        def fwd():
            with torch.inference_mode():
                return base.apply_model(x, sigma, transformer_options=topts, **kw)

        if knob is not None:  # the knob holds only while this row's model runs (every other row: unset)
            plain = fwd

            def fwd():
                saved = [(module, attr, getattr(module, attr)) for module, attr, _ in knob]
                for module, attr, value in knob:
                    setattr(module, attr, value)
                try:
                    return plain()
                finally:
                    for module, attr, value in saved:
                        setattr(module, attr, value)

        return Row(v, size, fwd, tokens)

    # ---- measuring -------------------------------------------------------------------------------
    def check_output(self, row: Row, y) -> None:
        v = row.variant
        yf = y.float().cpu()
        key = (v.case.kind, str(row.size), v.lora)
        if v.fmt == "bf16" and not v.compile and key not in self.refs:
            self.refs[key] = yf
        ref = self.refs.get(key)
        if ref is not None:
            row.rel_errs.append(float((yf - ref).norm() / ref.norm()))
        if not torch.isfinite(yf).all():
            row.info["nonfinite_output"] = True

    def probe(self, row: Row) -> float:
        """The row's first two forwards: the first (compile rows: the compilation, kept as ``compile_s``;
        others: lazy kernel builds, autotuning) gives the output checked against bf16, the second's time is
        what the row's cost is estimated from."""
        v = row.variant
        t = time.perf_counter()
        y = row.fwd()
        mt.sync(self.cuda)
        if v.compile:
            row.info["compile_s"] = round(time.perf_counter() - t, 2)
            self.budget.saw_compile(row.info["compile_s"])
        self.check_output(row, y)
        t = time.perf_counter()
        row.fwd()
        mt.sync(self.cuda)
        return (time.perf_counter() - t) * 1e3

    def measure_round(self, row: Row, first_round: bool) -> None:
        a, v, fwd = self.a, row.variant, row.fwd
        t = time.monotonic()
        if not first_round:  # round 0's output was checked by the probe
            y = fwd()
            mt.sync(self.cuda)
            self.check_output(row, y)
        r = {"ms": mt.time_eager(fwd, a.n, a.warmup, self.cuda)}
        if self.cuda and not a.no_graph and not v.compile and "graph_error" not in row.info:
            r["gpu_only_ms"], err = mt.time_graph(fwd, a.n)
            if err:
                row.info["graph_error"] = err
        if self.cuda:
            r["host_ms"], note = mt.time_host(fwd, r["ms"], a.host_samples)
            if note:
                row.info["host_note"] = note
        else:
            r["host_ms"] = r["ms"]  # on the CPU the forward runs where it is enqueued
        if first_round:
            row.info["paths"], label = mc.layer_paths(v.patcher, v.stock)
            if label:
                row.info["stock_path"] = label
            if self.cuda:
                own = mc.resident_bytes(v.patcher, self.dev)
                extra = mt.transient_bytes(fwd)
                row.info["transient_gb"] = round(extra / 1e9, 3)
                row.info["resident_gb"] = round(own / 1e9, 3)
                row.info["peak_vram_gb"] = round((own + extra) / 1e9, 3)
        row.rounds.append(r)
        row.round_s = time.monotonic() - t

    def first_round(self, row: Row) -> None:
        v = row.variant
        est_first = None
        try:
            first_ms = self.probe(row)
            if not v.unsupported and v.stock and v.fmt != "bf16" and row.rel_errs and row.rel_errs[-1] > STOCK_MAX_REL_ERR:
                v.unsupported = (f"stock ComfyUI {self.version}: output rel. err {row.rel_errs[-1]:.2f} vs bf16 "
                                 "(a correct FP8 row is ~2e-3): this core does not apply the file's scales; not timed")
            if v.unsupported:
                row.done = True
                return
            est_first = mt.row_round_cost(first_ms, self.a.n, self.a.warmup, not self.a.no_graph and not v.compile,
                                          self.a.host_samples, self.cuda)
            if not self.budget.fits(self.a.repeats * est_first):
                self.budget.skip("row", self.a.repeats * est_first, **v.ident(), size=size_label(v.case.kind, row.size))
                row.done, row.info["skipped"] = True, True
                return
            self.measure_round(row, True)
            row.reserved = (self.a.repeats - 1) * row.round_s
            self.budget.commit(row.reserved)
        except Exception as e:  # noqa: BLE001 - one failing row must not end the run
            self.fail(row, e)

    def later_round(self, row: Row, rnd: int) -> None:
        if row.done:
            return
        share = row.reserved / max(1, self.a.repeats - rnd)
        self.budget.release(share)
        row.reserved -= share
        est = max(share, row.round_s)
        if not self.budget.fits(est):
            self.budget.skip(f"round {rnd + 1}", est, **row.variant.ident(),
                             size=size_label(row.variant.case.kind, row.size))
            row.info["budget_note"] = f"rounds {rnd + 1}-{self.a.repeats} of {self.a.repeats} skipped by --budget-s"
        else:
            try:
                self.measure_round(row, False)
                return
            except Exception as e:  # noqa: BLE001
                self.fail(row, e)
        self.budget.release(row.reserved)  # no later rounds either
        row.reserved, row.done = 0.0, True

    def fail(self, row: Row, e: Exception) -> None:
        row.info["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row.done = True
        print(f"[bench_model] {row.variant.ident()} {row.size}: {row.info['error']}", flush=True)

    # ---- one model -------------------------------------------------------------------------------
    def run_model(self, case: ModelCase, sizes, formats, eager=True, compile_=False) -> None:
        a = self.a
        work = Path(a.work_dir) / case.tag()
        work.mkdir(parents=True, exist_ok=True)
        src = work / "bf16.safetensors"
        save_source(case, src, self.dev if self.cuda else "cpu")
        src_gb = src.stat().st_size / 1e9
        lora_sd = lora_state_dict(layer_shapes(case, src), case.kind, a.lora_rank) if a.lora else None
        compile_sizes = [s for s in sizes if s in a.compile_sizes] or sizes[:1]
        variants = self.variants(case, formats, eager, compile_)
        # A converted file is deleted once its last variant is loaded (unless --keep-files): a 64 GB disk
        # does not hold every format of a real-width model at once.
        last_user = {}
        for i, v in enumerate(variants):
            if v.base is None and v.fmt != "bf16":
                last_user[self.file_name(v.fmt)] = i
        rows: list[Row] = []
        for i, v in enumerate(variants):  # round 0, setting up each variant just before its rows
            vsizes = compile_sizes if v.compile or not v.timed else sizes
            converts = v.base is None and v.fmt != "bf16" and not (work / self.file_name(v.fmt)).exists()
            if v.base is None:
                est = self.budget.setup_estimate(src_gb, None, converts, False)
            else:  # a clone: compilation (LoRA patching is not estimated)
                est = self.budget.setup_estimate(0.0, 0.0, False, v.compile)
            ref_only = not v.timed and v.fmt == "bf16" and not v.lora
            if v.timed or ref_only or any(w.base is v for w in variants):
                if (v.base is not None and v.base.budget_skipped) or (not self.budget.fits(est) and v.fmt != "bf16"):
                    what = "row (its base variant was skipped)" if v.base is not None and v.base.budget_skipped \
                        else "row (setup)"
                    if v.timed or v.compile:
                        for s in vsizes:
                            self.budget.skip(what, est, **v.ident(), size=size_label(case.kind, s))
                    v.budget_skipped = True
                    continue
                try:
                    self.setup(v, work, src, lora_sd)
                except Exception as e:  # noqa: BLE001
                    v.error = f"{'convert/load' if v.base is None else 'clone'}: {type(e).__name__}: {str(e)[:300]}"
                    print(f"[bench_model] {v.ident()}: {v.error}", flush=True)
            if not a.keep_files and v.base is None and v.fmt != "bf16" and last_user.get(self.file_name(v.fmt)) == i:
                (work / self.file_name(v.fmt)).unlink(missing_ok=True)
            if v.patcher is None and v.error is None and not v.unsupported:
                continue  # skipped above, or not needed
            for s in vsizes:
                if v.patcher is not None and not (v.timed or v.compile):
                    if ref_only:  # the reference output the compile rows compare with
                        try:
                            row = self.make_row(v, s)
                            self.check_output(row, row.fwd())
                        except Exception as e:  # noqa: BLE001
                            self.notes.append(f"{case.kind} bf16 reference at {s} failed: {type(e).__name__}: {e}")
                    continue  # set up only for its compile clone
                row = Row(v, s)
                if v.patcher is not None:
                    try:
                        row = self.make_row(v, s)
                        mc.activate(v.patcher)
                    except Exception as e:  # noqa: BLE001
                        self.fail(row, e)
                    else:
                        self.first_round(row)
                else:
                    row.done = True  # unsupported or failed: nothing to time
                if v.error:
                    row.info["error"] = v.error
                rows.append(row)
                self.rows.append(row)
                self.log(row)
            self.progress()
        for rnd in range(1, a.repeats):  # rounds 1.. in the same order
            for v in variants:
                live = [r for r in rows if r.variant is v and not r.done]
                if not live:
                    continue
                try:
                    mc.activate(v.patcher)
                except Exception as e:  # noqa: BLE001
                    for row in live:
                        self.budget.release(row.reserved)
                        row.reserved = 0.0
                        self.fail(row, e)
                    continue
                for row in live:
                    self.later_round(row, rnd)
                    self.log(row)
                self.progress()
        for v in variants:
            v.patcher = None
        if not a.keep_files:
            for name in last_user:
                (work / name).unlink(missing_ok=True)
        mc.unload()
        if compile_:
            torch._dynamo.reset()

    def progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress()

    def log(self, row: Row) -> None:
        v, last = row.variant, (row.rounds[-1] if row.rounds else {})
        state = v.unsupported or row.info.get("error") or ("skipped" if row.info.get("skipped") else "")
        print(f"[bench_model] {v.case.kind} {v.fmt} {size_label(v.case.kind, row.size)} compile={v.compile} "
              f"lora={v.lora} round {len(row.rounds)}: ms={last.get('ms')} graph={last.get('gpu_only_ms')} "
              f"host={last.get('host_ms')} err={row.rel_errs[-1] if row.rel_errs else None} {state}", flush=True)

    # ---- output ----------------------------------------------------------------------------------
    def row_dicts(self) -> list[dict]:
        out = []
        for row in self.rows:
            v = row.variant
            if row.info.get("skipped"):
                continue  # listed in the budget's skipped list
            d = {**v.ident(), "size": size_label(v.case.kind, row.size), "tokens": row.tokens,
                 "depth": v.case.depth_label(), "repeats": len(row.rounds)}
            for k in ("ms", "gpu_only_ms", "host_ms"):
                med, lo, hi = mt.spread(r.get(k) for r in row.rounds)
                d[k], d[k + "_min"], d[k + "_max"] = med, lo, hi
            d["rel_err"] = max(row.rel_errs) if row.rel_errs else None
            d["weights_gb"], d["convert_s"] = v.weights_gb, v.convert_s
            if v.unsupported:
                d["unsupported"] = v.unsupported
            if not self.cuda:
                d.setdefault("graph_error", "not measured (CPU device)")
            elif v.compile:
                d.setdefault("graph_error", "not measured (compile row)")
            elif self.a.no_graph:
                d.setdefault("graph_error", "--no-graph")
            d.update(row.info)
            d.setdefault("peak_vram_gb", None)
            out.append(d)
        return out
