"""``--target-size`` / ``--target-bpw``: choose each layer's format under a size budget.

Candidates per layer (``MENU``): kept in its own dtype (bf16 in a bf16 file), INT8 per-row, INT6 and INT5
(groups of 32 or 128) and NF4 (blocksize 64 or 256: 4.5 / 4.125 bits per weight); layers the primary plan keeps (embeddings, presets, exclusions) stay
kept. For every candidate the layer is really quantized (round to nearest) and its sensitivity measured:
the squared weight error ``||W - Q(W)||²`` (data-free) or, with calibration statistics, the output error
``tr((W-Q) XᵀX (W-Q)ᵀ)`` (diagonal ``E[x²]`` when only that was collected). Bytes come from the codecs'
``output_specs`` (what the writer will write).

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
from .formats import get_codec

# (label, layer-config entry, codec name, codec opts); None codec = kept unquantized
MENU = [
    ("keep", {"format": "skip"}, None, {}),
    ("int8 per-row", {"format": "int8_tensorwise", "per_row": True}, "int8_tensorwise", {"per_row": True}),
    ("int6 g32", {"format": "int6_groupwise"}, "int6_groupwise", {"group_size": 32}),
    ("int6 g128", {"format": "int6_groupwise", "group_size": 128}, "int6_groupwise", {"group_size": 128}),
    ("int5 g32", {"format": "int5_groupwise"}, "int5_groupwise", {"group_size": 32}),
    ("int5 g128", {"format": "int5_groupwise", "group_size": 128}, "int5_groupwise", {"group_size": 128}),
    ("nf4 b64", {"format": "bnb_nf4"}, "bnb_nf4", {"blocksize": 64, "double_quant": False}),
    ("nf4 b256", {"format": "bnb_nf4", "blocksize": 256}, "bnb_nf4", {"blocksize": 256, "double_quant": False}),
]
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


def _sensitivity(w32, deq, stats) -> float:
    e = deq - w32
    if stats is None:
        return float(e.square().sum())
    if "xtx" in stats:
        h = stats["xtx"].to(torch.float32)
        return float(((e @ h) * e).sum())
    return float((e.square() * stats["sqmean"].to(torch.float32)).sum())


def measure(plans, reader, calib=None) -> dict[str, list[Candidate]]:
    """Candidates of every quantized planned layer (bytes and measured sensitivity)."""
    out = {}
    for p in plans:
        if not p.quantized:
            continue
        w = reader.read(p.name)
        w32 = w.to(torch.float32)
        stats = None
        if calib is not None and calib.resolve(p.layer) is not None:
            stats = calib.stats_for(p.layer, int(p.shape[1]))
        cands = []
        for label, entry, name, opts in MENU:
            if name is None:
                cands.append(Candidate(label, entry, w.numel() * w.element_size(), 0.0))
                continue
            codec = get_codec(name)
            q = codec.quantize(w, **opts)
            d = codec.dequantize(q, tuple(w.shape), torch.float32,
                                 **{k: v for k, v in opts.items() if k != "dtype"})
            nbytes = sum(s.nbytes for s in codec.output_specs(tuple(w.shape), **opts).values()) + _CQ_BYTES
            cands.append(Candidate(label, entry, nbytes, _sensitivity(w32, d, stats)))
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


def budget_config(input_path, options, target_size: int | None = None, target_bpw: float | None = None,
                  calibration=None) -> tuple[dict, str]:
    """(``--layer-config`` dict, printed plan) for a budget on ``input_path``; see the module docstring."""
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
        cands = measure(plans, reader, calib)
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
        for _ in range(4):
            size = file_size(choice)
            if size <= target_size and (best is None or size > best[0]):
                best = (size, choice)
            if size <= target_size and size >= 0.995 * target_size:
                break
            budget += target_size - size
            choice = choose(cands, budget)
        if best is None:
            raise OptionError(f"--target-size {target_size:,} bytes: no choice of formats fits (smallest file "
                              f"{size:,} bytes)")
        choice = best[1]
        other = best[0] - sum(c.nbytes for c in choice.values())
    return layer_config(choice), plan_text(choice, other, total_budget, weights)


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
    cands = measure(plans, _Reader(), calib)
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
