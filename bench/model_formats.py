"""Row names of the whole-model benchmark -> the converter's PlanOptions fields.

A row name is a registry format name (as in ``.comfy_quant``; a second variant of one format gets
``+key``, e.g. ``int8_tensorwise+row``), ``mixed_nf4_fp8`` (NF4 with the attention projections in FP8),
or ``BASE+svdR`` / ``BASE+hadamard`` / ``BASE+row|block|tensor`` modifiers on any of those.
"""

from __future__ import annotations

# The attention projections: FP8 in ``mixed_nf4_fp8``, LoRA targets in the LoRA rows.
MIXED_FP8_LAYERS = {"flux": r"attn\.(qkv|proj)$", "wan": r"(self_attn|cross_attn)\.(q|k|v|o)$"}
EXTRA_FORMATS = ("mixed_nf4_fp8", "bnb_nf4+svd32", "bnb_nf4+hadamard")
COMPILE_DEFAULT = ("bf16", "stock_fp8", "float8_e4m3fn", "mxfp8", "hybrid_mxfp8")
# Default order: the formats the speed targets name first, so a tight --budget-s drops the others.
PRIORITY = ("float8_e4m3fn", "hybrid_mxfp8", "mxfp8", "float8_e4m3fn_rowwise", "int8_tensorwise+row", "bnb_nf4",
            "mixed_nf4_fp8", "nvfp4")


def registry_formats() -> dict[str, dict]:
    """Row name -> PlanOptions fields, from the registry (a second variant of a format gets ``+key``)."""
    from hybridquant.converter.formats import registry
    from hybridquant.converter.plan import SCALING_MODES

    out, seen = {}, set()
    for spec, v in registry.choices():
        name = spec.name if spec.name not in seen else f"{spec.name}+{v.key}"
        seen.add(spec.name)
        opts = {"mode": spec.family}
        if v.key in SCALING_MODES:
            opts["scaling_mode"] = v.key
        elif v.key:
            opts["bnb_quant_type"] = v.key
        out[name] = opts
    return out


def default_formats() -> list[str]:
    """Every registry format plus the extras, the speed targets' formats first."""
    every = [*registry_formats(), *EXTRA_FORMATS]
    return [f for f in PRIORITY if f in every] + [f for f in every if f not in PRIORITY]


def split_knob(name: str) -> tuple[str, str | None]:
    """``"FMT@KNOB"`` -> ``("FMT", "KNOB")``: the same file, run with ``--knob KNOB`` set (bench_model)."""
    head, sep, knob = name.partition("@")
    return head, (knob if sep else None)


def plan_fields(name: str, model: str) -> dict:
    """PlanOptions fields for a row name (see the module docstring); unknown names raise SystemExit."""
    name = split_knob(name)[0]
    base = registry_formats()
    if name in base:
        return dict(base[name])
    if name == "mixed_nf4_fp8":
        return {"mode": "bnb4bit", "bnb_quant_type": "nf4", "custom_layers": MIXED_FP8_LAYERS[model],
                "custom_type": "fp8"}
    head, *mods = name.split("+")
    if head not in base and head != "mixed_nf4_fp8":
        raise SystemExit(f"--formats: unknown format {name!r}; known: {', '.join([*base, *EXTRA_FORMATS])}")
    out = plan_fields(head, model)
    for m in mods:
        if m.startswith("svd") and m[3:].isdigit():
            out["svd_rank"] = int(m[3:])
        elif m.startswith("hadamard"):
            out["rotate"] = m
        elif m in ("row", "block", "tensor"):
            out["scaling_mode"] = m
        else:
            raise SystemExit(f"--formats: unknown modifier {m!r} in {name!r} (svdR, hadamard, row, block)")
    return out
