"""The "Quantize Model" node's choices and their translation to the converter's options.

No ComfyUI import here (unit-testable). Every choice is derived from the format registry
(``converter.formats.registry.choices()``): the option text is the variant's label plus its stored
bits per weight, the tooltip adds the size against bf16 and the spec's plain-language summary (which
GPUs run it fast, quality). ``build_options`` maps a choice onto the converter's ``PlanOptions`` fields,
which follow the CLI flags (``mode`` = the spec's family, ``scaling_mode`` / ``bnb_quant_type`` = the
variant key). Values of older workflows (``bnb_nf4``, ``fp8 tensorwise``, ``int8 per-row`` ...) are
still understood: ``LEGACY`` maps them onto the current option text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..converter.formats import registry

SCALING_KEYS = ("tensor", "row", "block")  # the variant keys that are --scaling_mode values
BF16_BITS = 16.0
DEFAULT_PREFIX = "hybridquant/quantized"
CALIBRATED = "gptq"  # the rounding method that needs a calibration file
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_\-. ]+(/[A-Za-z0-9_\-. ]+)*$")


@dataclass(frozen=True)
class Choice:
    text: str  # what the combo shows
    format: str  # registry format name
    family: str
    key: str  # variant key
    bits: float  # stored bits per weight
    help: str  # one tooltip line


def _choice(spec, variant) -> Choice:
    bits = registry.bits_per_weight(spec.name, **dict(variant.opts))
    text = f"{variant.label} · {bits:.3g} bits/weight"
    pct = 100.0 * bits / BF16_BITS
    note = f" ({variant.note})" if variant.note else ""
    help_ = f"{variant.label}{note}: {bits:.3g} bits per weight, {pct:.0f}% of bf16's size. {spec.summary}."
    return Choice(text, spec.name, spec.family, variant.key, bits, help_)


def primary_choices() -> list[Choice]:
    return [_choice(s, v) for s, v in registry.choices()]


def custom_choices() -> list[Choice]:
    return [_choice(s, v) for s, v in registry.choices(custom_only=True)]


def _by_text(choices: list[Choice]) -> dict[str, Choice]:
    return {c.text: c for c in choices}


def _legacy_names(c: Choice) -> list[str]:
    """The option strings earlier versions of the node used for this choice."""
    names = [c.format] if not registry.get_spec(c.format).writes_comfy_quant else []
    if c.key in SCALING_KEYS:
        names.append(f"{c.family} {'per-row' if c.key == 'row' and c.family == 'int8' else c.key + 'wise'}")
        if c.key == "row":
            names.append(f"{c.family} rowwise")
    elif not c.key:
        names.append(c.family)
    return names


def legacy_map() -> dict[str, str]:
    """Old option value -> current option text (primary and custom choices share the texts)."""
    out = {}
    for c in primary_choices():
        for old in _legacy_names(c):
            out.setdefault(old, c.text)
    return out


def resolve_choice(value: str, custom: bool = False) -> Choice:
    choices = _by_text(custom_choices() if custom else primary_choices())
    value = legacy_map().get(value, value)
    if value not in choices:
        what = "custom_format" if custom else "format"
        raise ValueError(f"{what}: unknown choice {value!r}")
    return choices[value]


def options_help(custom: bool = False) -> str:
    lines = [c.help for c in (custom_choices() if custom else primary_choices())]
    head = ("Format of the layers matched by custom_layers (8-bit/MX/NV layers inside any file)."
            if custom else "Format of every quantized layer not matched by custom_layers. The default suits "
                           "this machine's GPU.")
    return head + "\n" + "\n".join("• " + ln for ln in lines)


def default_choice(features: tuple[str, ...]) -> Choice:
    """The default format for a device with these ``ops.capabilities.features`` (best first).

    The first feature that some format has a fast kernel for decides (FP8 on Ada/Hopper/Blackwell,
    INT8 on RTX 30xx / A100); among that format's variants the one with the most scale data (the
    finest scaling: INT8 per row rather than per tensor). A device with no 8-bit kernels (older GPUs,
    CPU) gets the smallest format with a kernel on any CUDA GPU, bitsandbytes NF4."""
    choices = primary_choices()
    for feature in features:
        if feature in ("triton_cuda", "cuda"):  # kernels for any (recent) GPU: not a reason to pick a format
            break
        for c in choices:
            if feature in registry.get_spec(c.format).kernels:
                same = [d for d in choices if d.format == c.format]
                return max(same, key=lambda d: d.bits)
    small = [c for c in choices if registry.get_spec(c.format).four_bit and "cuda" in registry.get_spec(c.format).kernels]
    return (small or choices)[0]


def device_default() -> Choice:
    """``default_choice`` for the device ComfyUI runs on (CPU / no ComfyUI: the NF4 fallback)."""
    try:
        import comfy.model_management as mm

        from ..ops import capabilities as caps

        return default_choice(caps.features(mm.get_torch_device()))
    except Exception:  # noqa: BLE001 - no ComfyUI / no device: the device-independent default
        return default_choice(())


def default_custom() -> Choice:
    return custom_choices()[0]


def preset_choices() -> list[str]:
    from ..converter.presets import PRESETS

    return ["none"] + sorted(PRESETS)


def preset_help() -> str:
    from ..converter.presets import PRESETS

    return ("Model preset: keeps that architecture's sensitive layers in high precision. "
            + "; ".join(f"{k}: {p.title}" for k, p in sorted(PRESETS.items())))


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


MAX_SVD_RANK = 1024
TARGET_SIZE_HELP = ("Size budget (optional): the file size to fit, e.g. '6.5GB', '900MB', '2GiB', or bits per "
                    "quantized weight, e.g. '5.5bpw'. Each layer then gets the format (bf16, INT8, INT6, INT5, "
                    "NF4, NVFP4 ...) that keeps the model's error lowest within the budget; 'format' still "
                    "decides the layers the budget does not cover. The panel previews the choice (reads the "
                    "weights). Empty: no budget.")
SVD_RANK_HELP = ("Low-rank branch (SVDQuant-style): keep the R strongest directions of each quantized weight in "
                 "bf16 beside the quantized rest. Lowers 4-bit error (MiniLM NF4: 0.58x) at R*(in+out)*2 bytes "
                 "per layer (cheap on wide layers). 0: off.")
ROTATE_HELP = ("Hadamard rotation of each quantized layer's inputs (QuaRot-style; 'hadamard:B' picks the block). "
               "Measured weight-only it RAISES the error of NF4/NVFP4 on a model with outlier input channels "
               "(MiniLM: 1.23x / 1.59x); meant for experiments. none: off.")


def rotate_choices() -> list[str]:
    from ..converter import rotation

    blocks = []
    b = 16
    while b <= rotation.MAX_BLOCK:
        blocks.append(f"{rotation.KIND}:{b}")
        b *= 2
    return ["none", rotation.KIND, *blocks]


def check_prefix(prefix: str) -> str:
    """A relative 'dir/name' prefix with no '..', absolute path or odd characters."""
    raw = (prefix or "").strip().replace("\\", "/")
    p = raw.rstrip("/")
    if (raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or not p or not _PREFIX_RE.match(p)
            or any(part in ("..", ".") for part in p.split("/"))):
        raise ValueError(f"filename_prefix {prefix!r}: use a relative name like 'hybridquant/my_model' "
                         "(letters, digits, '_', '-', '.', ' ' and '/'; no '..')")
    return p


def check_regex(pattern) -> None:
    if pattern:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"custom_layers: invalid regex {pattern!r}: {e}") from None


def settings_from_inputs(kw: dict) -> dict:
    fmt = kw.get("format") or device_default().text
    return {
        "format": legacy_map().get(fmt, fmt),
        "preset": kw.get("preset") or "none",
        "custom_layers": (kw.get("custom_layers") or "").strip(),
        "custom_format": legacy_map().get(kw.get("custom_format") or "", kw.get("custom_format") or default_custom().text),
        "rounding": kw.get("rounding") or "rtn",
        "save": bool(kw.get("save", False)),
        "calibration": kw.get("calibration") or "none",
        "filename_prefix": kw.get("filename_prefix") or DEFAULT_PREFIX,
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
    """Every check, input by input (the node's run calls it before touching the model)."""
    s = settings_from_inputs(kw)
    resolve_choice(s["format"])
    resolve_choice(s["custom_format"], custom=True)
    check_regex(s["custom_layers"])
    if s["save"]:
        check_prefix(s["filename_prefix"])
    budget_fields(s)
    if s["rounding"] == CALIBRATED and s["calibration"] == "none":
        raise ValueError("calibration: rounding 'gptq' needs a calibration file: record one with "
                         "'Collect Calibration (HybridQuant)' and pick it here")


def public_settings(s: dict) -> dict:
    """The settings recorded in the saved file's header (everything that decides the result)."""
    out = {"format": resolve_choice(s["format"]).format, "variant": resolve_choice(s["format"]).key,
           "preset": s["preset"], "rounding": s["rounding"]}
    for k in ("target_size", "svd_rank"):
        if s.get(k):
            out[k] = s[k]
    if s.get("rotate", "none") != "none":
        out["rotate"] = s["rotate"]
    if s.get("calibration", "none") != "none":
        out["calibration"] = s["calibration"]
    if s["custom_layers"]:
        c = resolve_choice(s["custom_format"], custom=True)
        out["custom_layers"] = s["custom_layers"]
        out["custom_format"] = c.format
        out["custom_variant"] = c.key
    return out


def options_key(s: dict) -> str:
    return json.dumps(public_settings(s) | {"save": s["save"], "prefix": s["filename_prefix"] if s["save"] else None},
                      sort_keys=True)


def _fields(c: Choice, custom: bool) -> dict:
    if custom:
        out = {"custom_type": c.family}
        if c.key in SCALING_KEYS:
            out["custom_scaling_mode"] = c.key
        return out
    out = {"mode": c.family}
    if c.key in SCALING_KEYS:
        out["scaling_mode"] = c.key
    elif c.key:
        out["bnb_quant_type"] = c.key
    return out


def build_options(s: dict):
    """The converter's options object for these settings."""
    validate_settings(s)
    fields = _fields(resolve_choice(s["format"]), custom=False)
    if s["custom_layers"]:
        fields["custom_layers"] = s["custom_layers"]
        fields.update(_fields(resolve_choice(s["custom_format"], custom=True), custom=True))
    if s["preset"] != "none":
        fields["presets"] = (s["preset"],)
    fields["method"] = s["rounding"]
    fields.update(budget_fields(s))
    from ..converter.plan import PlanOptions

    return PlanOptions(**fields)


def label_of(fmt: str) -> str:
    spec = registry.find_spec(fmt)
    return spec.label if spec is not None else fmt
