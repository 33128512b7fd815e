"""The "Quantize Model" node's choices and their translation to the converter's options.

No ComfyUI import here (unit-testable). The node shows formats by what users call them ("bnb_nf4",
"fp8 rowwise"); ``build_options`` maps them onto the converter's ``PlanOptions`` fields, which follow
the CLI flags (``mode``, ``scaling_mode``, ``bnb_quant_type``, ``custom_type``...).
"""

from __future__ import annotations

import json
import re

# display name -> converter option fields
PRIMARY_CHOICES: dict[str, dict] = {
    "bnb_nf4": {"mode": "bnb4bit", "bnb_quant_type": "nf4"},
    "bnb_fp4": {"mode": "bnb4bit", "bnb_quant_type": "fp4"},
    "fp8 tensorwise": {"mode": "fp8", "scaling_mode": "tensor"},
    "fp8 rowwise": {"mode": "fp8", "scaling_mode": "row"},
    "fp8 blockwise": {"mode": "fp8", "scaling_mode": "block"},
    "int8 tensorwise": {"mode": "int8", "scaling_mode": "tensor"},
    "int8 per-row": {"mode": "int8", "scaling_mode": "row"},
    "int8 blockwise": {"mode": "int8", "scaling_mode": "block"},
    "mxfp8": {"mode": "mxfp8"},
    "nvfp4": {"mode": "nvfp4"},
}
# Custom layers take the same 8-bit/MX/NV choices (not bitsandbytes, which is a primary mode only),
# expressed as the converter's --custom-* fields.
CUSTOM_CHOICES: dict[str, dict] = {
    name: {"custom_type": f["mode"], **({"custom_scaling_mode": f["scaling_mode"]} if "scaling_mode" in f else {})}
    for name, f in PRIMARY_CHOICES.items() if f["mode"] != "bnb4bit"
}
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_\-. ]+(/[A-Za-z0-9_\-. ]+)*$")


def preset_choices() -> list[str]:
    from ..converter.presets import PRESETS

    return ["none"] + sorted(PRESETS)


def rounding_choices() -> list[str]:
    from ..converter.rounding import METHODS

    return list(METHODS)


def default_rounding() -> str:
    from ..converter import rounding

    return getattr(rounding, "DEFAULT_METHOD", "rtn")


def rounding_help() -> str:
    from ..converter import rounding

    helps = getattr(rounding, "METHOD_HELP", {})
    return "How weights are rounded onto the grid. " + "; ".join(f"{m}: {h}" for m, h in helps.items())


CALIBRATED = "gptq"  # the rounding method that needs a calibration file


def check_prefix(prefix: str) -> str:
    """A relative 'dir/name' prefix with no '..', absolute path or odd characters."""
    raw = (prefix or "").strip().replace("\\", "/")
    p = raw.rstrip("/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or not p or not _PREFIX_RE.match(p) or any(part in ("..", ".") for part in p.split("/")):
        raise ValueError(f"filename_prefix {prefix!r}: use a relative name like 'hybridquant/my_model' "
                         "(letters, digits, '_', '-', '.', ' ' and '/'; no '..')")
    return p


def settings_from_inputs(kw: dict) -> dict:
    return {
        "format": kw.get("format", "bnb_nf4"),
        "preset": kw.get("preset", "none"),
        "custom_layers": (kw.get("custom_layers") or "").strip(),
        "custom_format": kw.get("custom_format", "fp8 tensorwise"),
        "rounding": kw.get("rounding", "rtn"),
        "save": bool(kw.get("save", False)),
        "calibration": kw.get("calibration") or "none",
        "filename_prefix": kw.get("filename_prefix", "hybridquant/quantized"),
        # issue 14: "" = none; "6.5GB" / "900MB" / bytes = size of all weights; "5.5bpw" = bits per weight
        "target_size": str(kw.get("target_size") or "").strip(),
        "svd_rank": int(kw.get("svd_rank") or 0),
        "rotate": str(kw.get("rotate") or "none"),
    }


def budget_fields(s: dict) -> dict:
    """PlanOptions fields of the budget / transform inputs (ValueError naming the input)."""
    from ..converter import rotation
    from ..converter.budget import parse_size
    from ..converter.errors import OptionError

    out: dict = {}
    t = s.get("target_size", "")
    if t:
        if t.lower().endswith("bpw"):
            try:
                out["target_bpw"] = float(t[:-3])
            except ValueError:
                raise ValueError(f"target_size: cannot read {t!r} as bits per weight (e.g. 5.5bpw)") from None
        else:
            try:
                out["target_size"] = parse_size(t)
            except OptionError as e:
                raise ValueError(f"target_size: {e}") from None
    if s.get("svd_rank", 0) < 0:
        raise ValueError(f"svd_rank: must be >= 0, got {s['svd_rank']}")
    if s.get("svd_rank"):
        out["svd_rank"] = s["svd_rank"]
    if s.get("rotate", "none") != "none":
        try:
            rotation.parse(s["rotate"])
        except ValueError as e:
            raise ValueError(f"rotate: {e}") from None
        out["rotate"] = s["rotate"]
    return out


def validate_settings(kw: dict) -> None:
    s = settings_from_inputs(kw)
    if s["format"] not in PRIMARY_CHOICES:
        raise ValueError(f"format: unknown {s['format']!r}; choose from {', '.join(PRIMARY_CHOICES)}")
    if s["custom_format"] not in CUSTOM_CHOICES:
        raise ValueError(f"custom_format: unknown {s['custom_format']!r}")
    if s["custom_layers"]:
        try:
            re.compile(s["custom_layers"])
        except re.error as e:
            raise ValueError(f"custom_layers: invalid regex {s['custom_layers']!r}: {e}") from None
    if s["save"]:
        check_prefix(s["filename_prefix"])
    budget_fields(s)
    if s["rounding"] == CALIBRATED and s["calibration"] == "none":
        raise ValueError("rounding 'gptq' needs a calibration file: record one with "
                         "'Collect Calibration (HybridQuant)' and pick it in 'calibration'")


def public_settings(s: dict) -> dict:
    """The settings recorded in the saved file's header (everything that decides the result)."""
    out = {k: s[k] for k in ("format", "preset", "rounding")}
    for k in ("target_size", "svd_rank"):
        if s.get(k):
            out[k] = s[k]
    if s.get("rotate", "none") != "none":
        out["rotate"] = s["rotate"]
    if s.get("calibration", "none") != "none":
        out["calibration"] = s["calibration"]
    if s["custom_layers"]:
        out["custom_layers"] = s["custom_layers"]
        out["custom_format"] = s["custom_format"]
    return out


def options_key(s: dict) -> str:
    return json.dumps(public_settings(s) | {"save": s["save"], "prefix": s["filename_prefix"] if s["save"] else None},
                      sort_keys=True)


def build_options(s: dict):
    """The converter's options object for these settings."""
    validate_settings(s)
    fields = dict(PRIMARY_CHOICES[s["format"]])
    if s["custom_layers"]:
        fields["custom_layers"] = s["custom_layers"]
        fields.update(CUSTOM_CHOICES[s["custom_format"]])
    if s["preset"] != "none":
        fields["presets"] = (s["preset"],)
    fields["method"] = s["rounding"]
    fields.update(budget_fields(s))
    from ..converter.plan import PlanOptions

    return PlanOptions(**fields)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def summary_text(report, s: dict, saved: str | None, seconds: float, run: int, ops_name: str) -> str:
    """The node's summary: formats by layer count, sizes, worst error per format, file, run number."""
    counts = report.formats()
    parts = ", ".join(f"{n} {f}" for f, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])))
    lines = [f"Quantized {sum(counts.values())} layers ({parts or 'none'}), kept {report.copied()} tensors; "
             f"{_human(report.bytes_in)} -> {_human(report.bytes_out)}"
             + (f" ({report.bytes_out / report.bytes_in:.1%})" if report.bytes_in else "")
             + f" in {seconds:.1f} s; ops {ops_name}",
             f"quantization run #{run} in this ComfyUI process"]
    for fmt, st in report.error_stats().items():
        mx = st.get("max")
        if mx is not None:
            lines.append(f"  {fmt}: relative weight error mean {st.get('mean', float('nan')):.4f}, max {mx:.4f}")
    lines.append("settings: " + json.dumps(public_settings(s), sort_keys=True))
    lines.append(f"saved: {saved}" if saved else "not saved (save is off)")
    return "\n".join(lines)
