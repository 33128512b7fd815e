"""What "Quantize Model" tells the user: why a plan that quantizes nothing is refused, warnings for
options that matched nothing, and the readable summary of a run (no JSON, no absolute paths)."""

from __future__ import annotations

import re
from collections import Counter

from . import quantize_options as qo

REUSED_HELD = "(same source and options as an earlier run: its result was reused, nothing quantized again)"
REUSED_FILE = "(same source and options as an earlier run: its saved file was loaded, nothing quantized again)"


_PLAIN = ((re.compile(r"^primary mode$"), "the main format"),
          (re.compile(r"^--custom-layers -> .*"), "matches custom_layers"),
          (re.compile(r"^--(\w+) preset: high precision$"), r"kept by preset \1"),
          (re.compile(r"^embedding table \(kept\)$"), "embedding table: kept"))


def plain_reason(reason: str) -> str:
    """The plan's reason (worded after the CLI flags) in the node's words."""
    for rx, words in _PLAIN:
        if rx.match(reason):
            return rx.sub(words, reason)
    return reason


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _candidates(plans):
    """Plans of the 2-D ``.weight`` tensors (the layers a format could apply to)."""
    return [p for p in plans if p.name.endswith(".weight") and len(p.shape) == 2]


def _reasons(plans) -> Counter:
    return Counter(p.reason for p in _candidates(plans) if not p.quantized)


def warnings(plans, s: dict) -> list[str]:
    out = []
    reasons = [p.reason for p in plans if p.quantized] + list(_reasons(plans))
    if s["custom_layers"] and not any(r.startswith("--custom-layers") for r in reasons):
        out.append(f"custom_layers {s['custom_layers']!r} matched no layer: every layer got the main format")
    if s["preset"] != "none" and not any(f"--{s['preset']} preset" in r for r in reasons):
        out.append(f"preset {s['preset']!r} matched no layer of this model (is it the right architecture?)")
    return out


def check_plan(plans, s: dict) -> None:
    """Raise (a clear ValueError) when the plan quantizes nothing; say why each layer is kept."""
    from .quantize_run import QuantizeError

    if any(p.quantized for p in plans):
        return
    cands = _candidates(plans)
    if not cands:
        raise QuantizeError("nothing to quantize: the model has no 2-D weight matrices")
    why = "; ".join(f"{n} × {plain_reason(r)}" for r, n in _reasons(plans).most_common(4))
    hint = ""
    if any("not a float weight" in p.reason for p in cands):
        hint = (" The weights are already 8-bit: if the model comes from 'Load Diffusion Model', set its "
                "weight_dtype to 'default'.")
    raise QuantizeError(f"nothing to quantize: all {len(cands)} weight matrices were kept ({why}).{hint}"
                        + "".join(" " + w + "." for w in warnings(plans, s)))


def summary_text(report, plans, s: dict, saved: str | None, seconds: float) -> str:
    counts = report.formats()
    parts = ", ".join(f"{n} {qo.label_of(f)}" for f, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])))
    n_cand = len(_candidates(plans))
    ratio = f" ({report.bytes_out / report.bytes_in:.0%})" if report.bytes_in else ""
    lines = [f"Quantized {sum(counts.values())} of {n_cand} layers: {parts} · "
             f"{_human(report.bytes_in)} → {_human(report.bytes_out)}{ratio} · {seconds:.1f} s"]
    kept = _reasons(plans)
    if kept:
        lines.append("kept in high precision: " + ", ".join(f"{n} ({plain_reason(r)})" for r, n in kept.most_common(4)))
    for fmt, st in report.error_stats().items():
        if st.get("max") is not None:
            lines.append(f"{qo.label_of(fmt)} weight error: mean {st['mean']:.1%}, worst {st['max']:.1%}")
    for w in warnings(plans, s):
        lines.append("⚠ " + w)
    lines.append(f"saved as {saved} (Load Diffusion Model (HybridQuant) loads it)" if saved
                 else "not saved (turn on 'save' to write a file)")
    return "\n".join(lines)
