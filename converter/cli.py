"""The ``convert_to_quant`` command line: a thin layer over ``convert.convert_file``, ``edit.edit_quant``
and ``hybridize.make_hybrid_mxfp8``.

Flag names follow the original convert-to-quant tool (both dash and underscore spellings). User
errors (``ConverterError``/``FormatError``) print one ``error: ...`` line on stderr and exit 2;
Ctrl+C/SIGTERM exit 130 after removing the temp output. Tracebacks only for bugs.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys

# Importing torch (via .formats) creates about a million Python objects; the cyclic collector's passes
# over them are ~0.15 s (10 %) of the command's start-up. Nothing cyclic needs collecting meanwhile, and
# what the imports built (modules, torch's op tables) lives as long as the command: frozen, the
# collector never walks it again. (Only the command imports this module; the node calls convert.py.)
_gc_was_on = gc.isenabled()
gc.disable()
try:
    from .errors import Cancelled, ConverterError, OptionError
    from .formats import FormatError, registry
    from .plan import PlanOptions, custom_types, primary_modes
    from .presets import PRESETS, preset_help
finally:
    gc.freeze()
    if _gc_was_on:
        gc.enable()


def _rounding():
    from . import rounding

    return rounding.METHODS, getattr(rounding, "DEFAULT_METHOD", "rtn")


def _method_help() -> str:
    from . import rounding

    helps = getattr(rounding, "METHOD_HELP", {})
    return "; ".join(f"{m}: {helps[m]}" if m in helps else m for m in rounding.METHODS)


# The historical spellings of the tool this CLI follows; other families are spelled --<family>.
_FAMILY_FLAGS = {"bnb4bit": ("--bnb-4bit", "--bnb4bit")}


def _flag(*names: str) -> list[str]:
    """Dash and underscore spellings of each long flag."""
    out: list[str] = []
    for n in names:
        for v in (n, n.replace("_", "-"), "--" + n[2:].replace("-", "_") if n.startswith("--") else n):
            if v not in out:
                out.append(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    methods, default_method = _rounding()
    rtn_note = ("round to nearest (RTN); it is currently the only method, so the default rounds to nearest too"
                if default_method == "rtn" else f"round to nearest (RTN) instead of the default method {default_method!r} "
                                                "(see --method); fastest")
    p = argparse.ArgumentParser(
        prog="convert_to_quant",
        description="Quantize a .safetensors checkpoint layer by layer (streaming; the output is written "
                    "atomically, the input is never modified). Default: FP8 e4m3fn, one scale per tensor.",
        epilog="Model presets and layer filters: --help-filters.")
    p.add_argument("-i", "--input", help="input .safetensors file")
    p.add_argument("-o", "--output", help="output file (default: <input stem>_<format>.safetensors beside the input)")
    g = p.add_argument_group("format (default: FP8 tensorwise)")
    m = g.add_mutually_exclusive_group()
    for family in primary_modes():  # one flag per format family of the registry
        members = registry.family_specs(family)
        # (argparse %-formats help texts: a summary's "40% of bf16's size" must be escaped)
        text = " / ".join(f"{s.label}: {s.summary}" for s in members if s.variants).replace("%", "%%")
        m.add_argument(*_flag(*_FAMILY_FLAGS.get(family, (f"--{family}",))), dest="mode", action="store_const",
                       const=family, help=text)
    g.add_argument("--format", dest="format_name", metavar="NAME", default=None,
                   help="the format by its .comfy_quant name (" + ", ".join(registry.format_names())
                        + "); same as the format's mode flag + variant options")
    m.add_argument(*_flag("--make-hybrid-mxfp8"), dest="make_hybrid", action="store_true",
                   help="turn an MXFP8 file into Hybrid MXFP8 (adds a tensorwise fallback scale per layer)")
    m.add_argument(*_flag("--edit-quant"), dest="edit_quant", action="store_true",
                   help="edit the quantization metadata of an existing quantized file (see --add-keys)")
    g.add_argument(*_flag("--scaling_mode"), dest="scaling_mode", default="tensor",
                   choices=["tensor", "row", "block", "block2d"], help="FP8/INT8 scale granularity (default tensor)")
    g.add_argument(*_flag("--block_size", "--group_size"), dest="block_size", type=int, default=None,
                   help="block size for --scaling_mode block (default 128)")
    g.add_argument(*_flag("--bnb-quant-type"), dest="bnb_quant_type", default="nf4",
                   choices=[v.key for spec in registry.family_specs("bnb4bit") for v in spec.variants])
    g.add_argument(*_flag("--bnb-blocksize"), dest="bnb_blocksize", type=int, default=64, help="default 64")
    g.add_argument(*_flag("--bnb-double-quant"), dest="bnb_double_quant", action="store_true",
                   help="nested (double) quantization of the absmax values")
    c = p.add_argument_group("mixed formats and filters (details: --help-filters)")
    c.add_argument(*_flag("--custom-layers"), dest="custom_layers", metavar="REGEX",
                   help="layers matching REGEX use --custom-type instead (wins over exclusions; any primary mode)")
    c.add_argument(*_flag("--custom-type"), dest="custom_type", choices=list(custom_types()))
    c.add_argument(*_flag("--custom-block-size"), dest="custom_block_size", type=int)
    c.add_argument(*_flag("--custom-scaling-mode"), dest="custom_scaling_mode", choices=["tensor", "row", "block", "block2d"])
    c.add_argument(*_flag("--custom-simple"), dest="custom_simple", action="store_true", help="RTN for custom layers")
    c.add_argument(*_flag("--custom-heur"), dest="custom_heur", action="store_true", help="--heur for custom layers")
    c.add_argument(*_flag("--exclude-layers"), dest="exclude_layers", metavar="REGEX", help="keep matching layers unquantized")
    c.add_argument(*_flag("--layer-config"), dest="layer_config", metavar="FILE.json",
                   help='JSON {"regex": {"format": "int8", "scaling_mode": "block", ...}, "_default": {...}}; most specific wins')
    c.add_argument("--heur", action="store_true", help="skip layers whose shape the format handles badly")
    c.add_argument(*_flag("--help-filters"), dest="help_filters", action="store_true", help="list presets and filters, then exit")
    for flag, preset in PRESETS.items():
        c.add_argument(f"--{flag}", dest=f"preset_{flag}", action="store_true", help=f"preset: keep {preset.title}")
    t = p.add_argument_group("transforms around any quantized format")
    t.add_argument(*_flag("--svd-rank"), dest="svd_rank", type=int, default=None, metavar="R",
                   help="keep a rank-R bf16 branch (svd_up/svd_down) per layer and quantize the residual "
                        "(layers whose smaller side is < 2R are left without it)")
    t.add_argument("--rotate", default=None, metavar="hadamard[:B]",
                   help="Hadamard-rotate each layer's input dim in blocks of B (default: largest power of two "
                        "<= 256 dividing in_features) before quantizing; the layer rotates its inputs at run time")
    t.add_argument(*_flag("--target-size"), dest="target_size", default=None, metavar="SIZE",
                   help="choose each layer's format (bf16, 8/6/5/4-bit) so that the whole output file fits SIZE "
                        "(bytes or 900MB, 6.5GB, 2GiB) with the least measured error; writes the plan as "
                        "<output>.layers.json (a --layer-config that reproduces the run)")
    t.add_argument(*_flag("--target-bpw"), dest="target_bpw", type=float, default=None, metavar="B",
                   help="like --target-size, as bits per weight of the quantizable layers")
    q = p.add_argument_group("rounding")
    q.add_argument("--simple", action="store_true", help=rtn_note)
    q.add_argument("--method", choices=list(methods), default=None,
                   help=f"rounding method (default {default_method!r}; with --calibration {_calibrated_method()!r}). "
                        + _method_help())
    q.add_argument("--calibration", metavar="FILE", help="calibration statistics (.safetensors) for calibrated rounding")
    md = p.add_argument_group("metadata")
    md.add_argument(*_flag("--comfy_quant"), dest="comfy_quant", action="store_true", default=True,
                    help="write per-layer .comfy_quant tensors (on by default)")
    md.add_argument(*_flag("--no-comfy-quant"), dest="comfy_quant", action="store_false", help="do not write .comfy_quant tensors")
    md.add_argument(*_flag("--save-quant-metadata"), dest="save_quant_metadata", action="store_true", default=None,
                    help="write the _quantization_metadata header (on by default when converting; with --edit-quant: rebuild it)")
    md.add_argument(*_flag("--no-quant-metadata"), dest="save_quant_metadata", action="store_false",
                    help="do not write the _quantization_metadata header")
    md.add_argument(*_flag("--full_precision_matrix_mult"), "-fpmm", dest="full_precision_matrix_mult", action="store_true",
                    help="mark layers full_precision_matrix_mult=true (dequantize, then matmul in high precision)")
    md.add_argument(*_flag("--input_scale"), dest="input_scale", action="store_true",
                    help="write .input_scale = 1.0 (float32) for FP8 layers")
    e = p.add_argument_group("editing (--edit-quant) and hybrid (--make-hybrid-mxfp8)")
    e.add_argument(*_flag("--add-keys"), dest="add_keys", help="add/update keys, e.g. 'full_precision_matrix_mult=true, note=\"a, b\"'")
    e.add_argument(*_flag("--remove-keys"), dest="remove_keys", help="comma-separated keys to remove")
    e.add_argument(*_flag("--quant-filter"), dest="quant_filter", metavar="REGEX", help="only edit matching layers")
    e.add_argument(*_flag("--tensor-scales"), dest="tensor_scales", metavar="FILE",
                   help="take the tensorwise scales of a hybrid file from this FP8 file")
    r = p.add_argument_group("run")
    r.add_argument(*_flag("--dry-run"), dest="dry_run", action="store_true", help="print the per-layer plan and sizes; write nothing")
    r.add_argument("--advise", action="store_true",
                   help="with --dry-run: also test each planned layer against alternative layouts and list where one "
                        "cuts the error >= 25%% for <= 5%% more bytes (reads every weight; with --calibration: output error)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    r.add_argument("--report", metavar="FILE.json", help="write the summary and per-layer errors as JSON")
    r.add_argument("--device", default="cpu", help="where the math runs: cpu (default), cuda, cuda:1 ...")
    r.add_argument(*_flag("--no-error-stats"), dest="error_stats", action="store_false",
                   help="skip the per-layer relative error (saves one dequantization per layer)")
    r.add_argument(*_flag("--error-sample"), dest="error_sample", type=float, default=None, metavar="FRACTION",
                   help="fraction of the rows of large (>16M weights) FP8/INT8 tensorwise/per-row layers that the "
                        "relative error is measured on (default 0.125; 1 = every weight)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def options_from_args(a) -> PlanOptions:
    methods, default_method = _rounding()
    if a.simple and a.method not in (None, "rtn"):
        raise OptionError(f"--simple (RTN) conflicts with --method {a.method}")
    mode = a.mode or "fp8"
    if a.format_name is not None:
        names = registry.format_names()
        if a.format_name not in names:
            raise OptionError(f"--format: unknown format {a.format_name!r}; valid names: {', '.join(names)}")
        if a.mode is not None and a.mode != registry.get_spec(a.format_name).family:
            raise OptionError(f"--format {a.format_name} conflicts with the --{a.mode} mode flag")
        mode = a.format_name
    return PlanOptions(
        mode=mode, scaling_mode=a.scaling_mode, block_size=a.block_size,
        bnb_quant_type=a.bnb_quant_type, bnb_blocksize=a.bnb_blocksize, bnb_double_quant=a.bnb_double_quant,
        custom_layers=a.custom_layers, custom_type=a.custom_type, custom_block_size=a.custom_block_size,
        custom_scaling_mode=a.custom_scaling_mode, custom_simple=a.custom_simple, custom_heur=a.custom_heur,
        exclude_layers=a.exclude_layers, layer_config=a.layer_config,
        presets=tuple(f for f in PRESETS if getattr(a, f"preset_{f}")), heur=a.heur,
        method="rtn" if a.simple else (a.method or (_calibrated_method() if a.calibration else default_method)),
        comfy_quant=a.comfy_quant, save_quant_metadata=True if a.save_quant_metadata is None else a.save_quant_metadata,
        full_precision_matrix_mult=a.full_precision_matrix_mult, input_scale=a.input_scale,
        svd_rank=a.svd_rank, rotate=a.rotate)


def _calibrated_method() -> str:
    from . import rounding

    return getattr(rounding, "CALIBRATED_METHOD", getattr(rounding, "DEFAULT_METHOD", "rtn"))


def default_output(inp: str, suffix: str) -> str:
    stem, _ = os.path.splitext(inp)
    return f"{stem}_{suffix}.safetensors"


def _mode_suffix(o: PlanOptions) -> str:
    if o.mode == "bnb4bit":
        return f"bnb_{o.bnb_quant_type}"
    if o.mode in ("fp8", "int8") and o.scaling_mode != "tensor":
        return f"{o.mode}_{o.scaling_mode}"
    return o.mode


def _on_sigterm(signum, frame):
    # Same path as Ctrl+C: unwinding runs the writer's cleanup (temp file removed).
    raise KeyboardInterrupt


def _run(a) -> int:
    from .report import TextProgress

    if a.help_filters:
        print(preset_help())
        return 0
    if not a.input:
        raise OptionError("-i/--input is required")
    progress = None if a.quiet else TextProgress(1)
    if a.edit_quant:
        from .edit import edit_quant

        out = a.output or default_output(a.input, "edited")
        rep = edit_quant(a.input, out, a.add_keys, a.remove_keys, a.quant_filter, overwrite=a.overwrite,
                         save_quant_metadata=bool(a.save_quant_metadata), progress=progress)
        _print_misc_report(rep, a.report, f"edited {out}")
        return 0
    if a.make_hybrid:
        from . import hybridize

        out = a.output or default_output(a.input, hybridize.TARGET_FORMAT)
        rep = hybridize.make_hybrid_mxfp8(a.input, out, tensor_scales=a.tensor_scales, overwrite=a.overwrite,
                                          progress=progress)
        _print_misc_report(rep, a.report, f"wrote {out}")
        return 0
    for flag in ("add_keys", "remove_keys", "quant_filter", "tensor_scales"):
        if getattr(a, flag):
            raise OptionError(f"--{flag.replace('_', '-')} only works with "
                              + ("--make-hybrid-mxfp8" if flag == "tensor_scales" else "--edit-quant"))
    if a.advise and not a.dry_run:
        raise OptionError("--advise only works with --dry-run")
    from .convert import convert_file

    opts = options_from_args(a)
    out = a.output or default_output(a.input, _mode_suffix(opts))
    if a.target_size is not None or a.target_bpw is not None:
        from . import budget
        from .convert import check_paths

        if opts.layer_config is not None:
            raise OptionError("--target-size/--target-bpw choose the layer config themselves; drop --layer-config")
        if not a.dry_run:  # the budget reads and test-quantizes every weight: refuse a bad output first
            check_paths(a.input, out, a.overwrite)
        size = budget.parse_size(a.target_size) if a.target_size is not None else None
        cfg, text = budget.budget_config(a.input, opts, size, a.target_bpw, a.calibration)
        print(text)
        cfg_path = os.path.splitext(out)[0] + ".layers.json"
        if not a.dry_run:
            budget.write_config(cfg, cfg_path)
            print(f"layer config: {cfg_path} (reproduce with --layer-config {cfg_path})")
        opts.layer_config = cfg
    rep = convert_file(a.input, out, opts, progress=progress, device=a.device, overwrite=a.overwrite,
                       dry_run=a.dry_run, error_stats=(a.error_sample if a.error_stats and a.error_sample is not None
                                                       else a.error_stats), calibration=a.calibration,
                       advise=a.advise)
    if a.dry_run:
        print(rep.plan_table())
    print(rep.summary())
    if a.report:
        rep.write_json(a.report)
    return 0


def _print_misc_report(rep, report_path, headline: str) -> None:
    import json

    print(headline)
    d = rep.to_dict() if hasattr(rep, "to_dict") else rep
    if isinstance(d, dict):
        for k, v in d.items():
            if not isinstance(v, (list, dict)) or len(json.dumps(v)) < 200:
                print(f"  {k}: {v}")
    if report_path:
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=1, default=str)


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    old = None
    try:
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        pass
    try:
        return _run(a)
    except Cancelled as e:
        print(f"error: {e}; no output written", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted; no output written (the input is untouched)", file=sys.stderr)
        return 130
    except (ConverterError, FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
