"""``--target-size`` / ``--target-bpw``: choose each layer's format under a size budget.

Candidates per layer (``menu()``, built from the format registry: every spec's ``budget_steps``): kept in
its own dtype (bf16 in a bf16 file), INT8 per-row, INT6 / INT5 (groups of 32, 64, 128), NF4 (blocksize 64;
double-quantized 32/64/128/256) and NVFP4; with ``--svd-rank`` / ``--rotate`` every 4-bit step also with
the branch, the rotation and both. Layers the primary plan keeps (embeddings, presets, exclusions) stay
kept. For every candidate the layer is really quantized (round to nearest) and its sensitivity measured
as a noise-to-signal ratio: ``||W - Q(W)||² / ||W||²`` (data-free) or, with calibration statistics,
``tr(E XᵀX Eᵀ) / tr(W XᵀX Wᵀ)`` (diagonal ``E[x²]`` when only that was collected). Bytes come from the
codecs' ``output_specs`` (what the writer will write).

Choice: minimise the summed sensitivity subject to the bytes (a multiple-choice knapsack), by a
Lagrangian search: for a price ``lam`` every layer picks ``argmin err + lam·bytes``; ``lam`` is bisected
to the cheapest price that fits, then remaining room is spent greedily on the upgrades with the best
error reduction per byte. ``--target-size`` counts the whole output file (tensors + header);
``--target-bpw`` the bits per weight of the quantizable layers.

The result is a ``--layer-config`` dict (one exact-name entry per layer), which reproduces the run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from .errors import OptionError
from .formats import FormatError, get_codec

KEEP = ("keep", {"format": "skip"}, None, {}, {})
_SHORT = {"group_size": "g", "blocksize": "b"}


def _step_label(spec, opts) -> str:
    parts = [spec.label.split(" ")[0].lower()]
    for k, v in opts.items():
        if k in _SHORT:
            parts.append(f"{_SHORT[k]}{v}")
        elif k == "per_row" and v:
            parts.append("per-row")
        elif k == "double_quant" and v:
            parts.append("dq")
    return " ".join(parts)


def menu(transforms: dict | None = None) -> list[tuple[str, dict, str | None, dict, dict]]:
    """The candidates, from the format registry (every spec's ``budget_steps``):
    ``(label, layer-config entry, codec name, codec opts, transforms)``. ``transforms`` (the run's
    ``--svd-rank`` / ``--rotate``) adds, for every 4-bit step, the step with each requested transform and
    with both: the budget decides per layer whether a branch or a rotation pays for its bytes. Every
    entry names its transforms explicitly (``svd_rank: 0``, ``rotate: none``) so the run's flags do not
    apply on top of the choice."""
    from .formats import registry

    transforms = dict(transforms or {})
    combos = [{}]
    if transforms.get("svd_rank"):
        combos.append({"svd_rank": transforms["svd_rank"]})
    if transforms.get("rotation"):
        combos.append({"rotation": transforms["rotation"]})
    if len(combos) == 3:
        combos.append({**combos[1], **combos[2]})
    out = [KEEP]
    for spec in registry.specs():
        for opts in spec.budget_steps:
            for t in (combos if spec.four_bit else [{}]):
                label = _step_label(spec, opts)
                entry = {"format": spec.name, **opts}
                if transforms:
                    entry["svd_rank"] = t.get("svd_rank", 0)
                    rot = t.get("rotation")
                    entry["rotate"] = (f"hadamard:{rot['block']}" if rot and rot.get("block") else
                                       ("hadamard" if rot else "none"))
                if t.get("svd_rank"):
                    label += f" + svd{t['svd_rank']}"
                if t.get("rotation"):
                    label += " + hadamard"
                out.append((label, entry, spec.name, dict(opts), t))
    return out


_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}
_CQ_BYTES = 64  # a .comfy_quant tensor + its header entry, about


def parse_size(text) -> int:
    """``"900MB"``, ``"6.5GB"``, ``"123456"``, ``"2GiB"`` -> bytes (MB/GB decimal, MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise OptionError(f"--target-size: cannot read {text!r}; use bytes or a unit, e.g. 900MB, 6.5GB, 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class Candidate:
    label: str
    entry: dict
    nbytes: int
    err: float


def _energy(m, stats) -> float:
    if stats is None:
        return float(m.square().sum())
    if "xtx" in stats:
        return float(((m @ stats["xtx"].to(torch.float32)) * m).sum())
    return float((m.square() * stats["sqmean"].to(torch.float32)).sum())


def _sensitivity(w32, deq, stats, relative: bool = False) -> float:
    """Squared weight error (``stats`` None) or expected output error ``tr(E XᵀX Eᵀ)``; ``relative``:
    divided by the layer's own (output) energy, i.e. the noise-to-signal ratio the layer adds."""
    e = _energy(deq - w32, stats)
    return e / max(_energy(w32, stats), 1e-30) if relative else e


def measure(plans, reader, calib=None, transforms: dict | None = None) -> dict[str, list[Candidate]]:
    """Candidates of every quantized planned layer (bytes and measured sensitivity).

    The sensitivity is RELATIVE (each layer's error over its own weight / output energy): measured on
    MiniLM (bench/bench_quality.py --budget) the absolute error made the budget spend its bytes on the
    layers with the largest weights and rate the many small ones cheap; the noise-to-signal ratio per
    layer tracks the model's output error better (calibrated: 0.733x vs 0.890x of NF4's error)."""
    from . import transforms as tfm
    from .plan import layer_transforms

    items = menu(transforms)
    out = {}
    for p in plans:
        if not p.quantized:
            continue
        w = reader.read(p.name)
        w32 = w.to(torch.float32)
        shape = tuple(w.shape)
        stats = None
        if calib is not None and calib.resolve(p.layer) is not None:
            stats = calib.stats_for(p.layer, int(p.shape[1]))
        cands, seen = [], set()
        for label, entry, name, opts, req in items:
            if name is None:
                cands.append(Candidate(label, entry, w.numel() * w.element_size(), 0.0))
                continue
            t = tfm.resolve(layer_transforms(req, shape), shape, p.name) if req else {}
            if req and (not t or json.dumps(t, sort_keys=True) in seen):
                continue  # the transform does not apply to this layer's shape: the plain step covers it
            codec = get_codec(name)
            dopts = {k: v for k, v in opts.items() if k != "dtype"}
            try:
                if t:
                    seen.add(json.dumps(t, sort_keys=True))
                    # the branch is fitted as the real run fits it (to the output error with calibration)
                    q = tfm.quantize(codec, w, t, "rtn", stats, name=p.name, **opts)
                    d = tfm.decode(codec, q, shape, t, **dopts)
                    extra = sum(x.nbytes for x in tfm.output_specs(shape, t).values())
                else:
                    d = codec.dequantize(codec.quantize(w, **opts), shape, torch.float32, **dopts)
                    extra = 0
            except FormatError:  # a step this shape cannot take (group size / block does not fit)
                continue
            nbytes = sum(s.nbytes for s in codec.output_specs(shape, **opts).values()) + extra + _CQ_BYTES
            cands.append(Candidate(label, entry, nbytes, _sensitivity(w32, d, stats, relative=True)))
        out[p.layer] = cands
        del w, w32
    return out


def choose(cands: dict[str, list[Candidate]], budget: int) -> dict[str, Candidate]:
    """The per-layer choice minimising the summed error with total bytes <= ``budget``."""
    if not cands:
        return {}
    floor = sum(min(c.nbytes for c in cs) for cs in cands.values())
    if floor > budget:
        raise OptionError(f"size budget too small: the smallest choice of every layer needs {floor:,} bytes "
                          f"for the quantized layers, the budget leaves {budget:,}")

    def pick(lam):
        return {k: min(cs, key=lambda c: (c.err + lam * c.nbytes, c.nbytes)) for k, cs in cands.items()}

    lo, hi = 0.0, 1.0
    while sum(c.nbytes for c in pick(hi).values()) > budget:
        hi *= 4
        if hi > 1e30:
            break
    if sum(c.nbytes for c in pick(lo).values()) <= budget:
        best = pick(lo)
    else:
        for _ in range(100):
            mid = (lo + hi) / 2
            if sum(c.nbytes for c in pick(mid).values()) > budget:
                lo = mid
            else:
                hi = mid
        best = pick(hi)
    # spend what is left: the upgrade with the largest error drop per extra byte that still fits
    used = sum(c.nbytes for c in best.values())
    while True:
        room = budget - used
        moves = [((best[k].err - c.err) / max(1, c.nbytes - best[k].nbytes), k, c)
                 for k, cs in cands.items() for c in cs if c.err < best[k].err and 0 < c.nbytes - best[k].nbytes <= room]
        if not moves:
            break
        _, k, c = max(moves, key=lambda m: m[0])
        used += c.nbytes - best[k].nbytes
        best[k] = c
    return best


def layer_config(choice: dict[str, Candidate]) -> dict:
    return {f"^{re.escape(layer)}$": dict(c.entry) for layer, c in choice.items()}


def plan_text(choice: dict[str, Candidate], other_bytes: int, budget_total: int | None, weights: int) -> str:
    per: dict[str, list] = {}
    for c in choice.values():
        s = per.setdefault(c.label, [0, 0, 0.0])
        s[0] += 1
        s[1] += c.nbytes
        s[2] += c.err
    q = sum(c.nbytes for c in choice.values())
    lines = ["size-budget plan:"]
    for label, (n, b, e) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {label:14s} {n:5d} layers  {b / 1e6:10.2f} MB  expected error {e:.4e}")
    total = q + other_bytes
    lines.append(f"  quantizable layers: {q / 1e6:.2f} MB ({8 * q / max(1, weights):.3f} bits/weight); other tensors "
                 f"+ header {other_bytes / 1e6:.2f} MB; file {total / 1e6:.2f} MB"
                 + (f" (budget {budget_total / 1e6:.2f} MB, {total / budget_total:.2%})" if budget_total else ""))
    lines.append(f"  expected error (sum): {sum(c.err for c in choice.values()):.4e}")
    return "\n".join(lines)


def _requested(options) -> dict:
    from .plan import parse_transforms

    return parse_transforms(getattr(options, "svd_rank", None), getattr(options, "rotate", None), "")


def summary(choice: dict[str, Candidate], other_bytes: int, budget_total: int | None, weights: int) -> dict:
    """The plan as data (the node's preview): per candidate label layers, bytes and expected error."""
    per: dict[str, dict] = {}
    for c in choice.values():
        s = per.setdefault(c.label, {"label": c.label, "layers": 0, "bytes": 0, "error": 0.0})
        s["layers"] += 1
        s["bytes"] += c.nbytes
        s["error"] += c.err
    q = sum(c.nbytes for c in choice.values())
    return {"formats": sorted(per.values(), key=lambda d: -d["bytes"]), "layer_bytes": q,
            "other_bytes": other_bytes, "file_bytes": q + other_bytes, "budget_bytes": budget_total,
            "bits_per_weight": 8 * q / max(1, weights), "expected_error": sum(c.err for c in choice.values()),
            "choice": {k: c.label for k, c in choice.items()}}


def budget_config(input_path, options, target_size: int | None = None, target_bpw: float | None = None,
                  calibration=None) -> tuple[dict, str]:
    """(``--layer-config`` dict, printed plan) for a budget on ``input_path``; see the module docstring."""
    choice, other, total, weights = budget_choice(input_path, options, target_size, target_bpw, calibration)
    return layer_config(choice), plan_text(choice, other, total, weights)


def budget_choice(input_path, options, target_size: int | None = None, target_bpw: float | None = None,
                  calibration=None) -> tuple[dict[str, Candidate], int, int | None, int]:
    """(per-layer choice, bytes of everything else, the file budget or None, quantizable weights)."""
    from .convert import OutputLayout, _dtype_name, make_plans
    from .safetensors_io import SafetensorsReader, read_header
    from .safetensors_writer import build_header

    if (target_size is None) == (target_bpw is None):
        raise OptionError("give exactly one of --target-size and --target-bpw")
    infos, metadata = read_header(input_path)
    plans = make_plans(((i.name, i.shape, _dtype_name(i.dtype)) for i in infos.values()), options)
    calib = None
    if calibration is not None:
        from .rounding.calibration import CalibrationFile

        calib = calibration if isinstance(calibration, CalibrationFile) else CalibrationFile(calibration)
    with SafetensorsReader(input_path) as reader:
        cands = measure(plans, reader, calib, _requested(options))
    weights = sum(int(p.shape[0]) * int(p.shape[1]) for p in plans if p.layer in cands)
    other = sum(infos[p.name].nbytes for p in plans if p.layer not in cands)
    # header + biases etc.: estimate from a layout of the all-kept plan, plus per-layer keys
    keep_layout = OutputLayout([p for p in plans if p.layer not in cands], {n: i.spec for n, i in infos.items()},
                               options, metadata)
    header, _ = build_header(keep_layout.specs, keep_layout.metadata)
    other += len(header) + 160 * len(cands)  # each quantized layer adds a few header entries
    if target_size is not None:
        budget = target_size - other
        total_budget = target_size
    else:
        budget = int(target_bpw * weights / 8)
        total_budget = None
    choice = choose(cands, budget)
    if target_size is not None:
        # the header's exact size depends on the choice: correct the tensor budget by the real layout's
        # file size and choose again (keeps the best choice that fits)
        import dataclasses

        specs = {n: i.spec for n, i in infos.items()}

        def file_size(ch):
            o = dataclasses.replace(options, layer_config=layer_config(ch))
            lay = OutputLayout(make_plans(((i.name, i.shape, _dtype_name(i.dtype)) for i in infos.values()), o),
                               specs, o, metadata)
            h, _ = build_header(lay.specs, lay.metadata)
            return len(h) + sum(x.nbytes for x in lay.specs.values())

        best = None
        for i in range(8):
            size = file_size(choice)
            if size <= target_size and (best is None or size > best[0]):
                best = (size, choice)
            if size <= target_size and size >= 0.995 * target_size:
                break
            # over: step back by the overshoot plus a growing margin (header entries differ per format,
            # so the same byte count can land a few bytes either side)
            budget += target_size - size - (64 << i if size > target_size else 0)
            choice = choose(cands, budget)
        if best is None:
            raise OptionError(f"--target-size {target_size:,} bytes: no choice of formats fits (smallest file "
                              f"{size:,} bytes)")
        choice = best[1]
        other = best[0] - sum(c.nbytes for c in choice.values())
    return choice, other, total_budget, weights


def budget_for_state_dict(state_dict, options, calibration=None) -> tuple[dict, str]:
    """``budget_config`` for an in-memory state dict (the Quantize Model node): ``options.target_size``
    (bytes of all tensors) or ``options.target_bpw``."""
    import dataclasses

    from .convert import _dtype_name, make_plans

    opts = dataclasses.replace(options, layer_config=None)
    sd = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    plans = make_plans(((k, tuple(v.shape), _dtype_name(v.dtype)) for k, v in sd.items()), opts)

    class _Reader:
        def read(self, name):
            return sd[name].detach().to("cpu")

    calib = None
    if calibration is not None:
        from .rounding.calibration import CalibrationFile

        calib = calibration if isinstance(calibration, CalibrationFile) else CalibrationFile(calibration)
    cands = measure(plans, _Reader(), calib, _requested(options))
    weights = sum(int(p.shape[0]) * int(p.shape[1]) for p in plans if p.layer in cands)
    other = sum(sd[p.name].numel() * sd[p.name].element_size() for p in plans if p.layer not in cands)
    if options.target_size is not None:
        budget, total = int(options.target_size) - other, int(options.target_size)
    else:
        budget, total = int(float(options.target_bpw) * weights / 8), None
    choice = choose(cands, budget)
    return layer_config(choice), plan_text(choice, other, total, weights)


def write_config(cfg: dict, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
