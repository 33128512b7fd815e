"""Library entry points of the converter: ``convert_file`` (streaming, file -> file) and
``quantize_state_dict`` (in memory, for the ComfyUI "Quantize Model" node), with the planning calls
``plan_file`` / ``plan_state_dict``.

Where the parts live: the output header as a function of the plan (``output_layout.py``), one layer's
quantization (``quantize_layer.py``), the reader / compute / writer threads of ``convert_file``
(``pipeline.py``, whose docstring describes the streaming and its memory bounds).

``progress(done_bytes, total_bytes, current_name)`` is called after each tensor; ``cancel()`` is polled
before each tensor and raises ``Cancelled`` when it returns true.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping

import torch

from .detection import DETECTION_SAFE
from .error_stats import relative_error, sample_fraction
from .errors import Cancelled, InputFileError, OptionError
from .formats.base import TensorSpec
from .metadata import encode_comfy_quant
from .output_layout import OutputLayout, codec_opts, comfy_quant_dict, dtype_name, layer_records
from .pipeline import run_pipeline
from .plan import UNSTORABLE, LayerPlan, Planner, PlanOptions
from .quantize_layer import prepare_calibration, quantize_layer
from .report import ConversionReport
from .safetensors_io import SafetensorsReader, read_header
from .safetensors_writer import AtomicSafetensorsWriter, check_output_path

log = logging.getLogger("hybridquant")
_dtype_name = dtype_name  # the name budget.py imports


def make_plans(infos_in_order, options: PlanOptions) -> list[LayerPlan]:
    planner = Planner(options)
    plans = [planner.plan(name, shape, dtype) for name, shape, dtype in infos_in_order]
    kept = [p.name for p in plans if p.reason.startswith(DETECTION_SAFE)]
    if kept:  # say it once per run, naming the layers (each plan's reason says why)
        log.warning("%d layer(s) kept in high precision because ComfyUI's model detection reads their shape "
                    "and the chosen format packs it: %s", len(kept), ", ".join(kept))
    unstorable = [p.name for p in plans if p.reason.startswith(UNSTORABLE)]
    if unstorable:
        log.warning("%d layer(s) kept in high precision because the chosen format cannot store their shape: %s",
                    len(unstorable), ", ".join(unstorable))
    return plans


def plan_file(input_path, options: PlanOptions | None = None) -> list[LayerPlan]:
    """The per-layer plan of converting ``input_path`` (header only: nothing is read or written)."""
    infos, _ = read_header(input_path)
    return make_plans(((i.name, i.shape, dtype_name(i.dtype)) for i in infos.values()), options or PlanOptions())


def plan_state_dict(state_dict: Mapping[str, torch.Tensor], options: PlanOptions | None = None) -> list[LayerPlan]:
    """The per-layer plan of ``quantize_state_dict`` on ``state_dict`` (nothing is quantized)."""
    items = ((k, tuple(v.shape), dtype_name(v.dtype)) for k, v in state_dict.items() if isinstance(v, torch.Tensor))
    return make_plans(items, options or PlanOptions())


def check_paths(input_path, output_path, overwrite: bool) -> None:
    """``safetensors_writer.check_output_path`` when there is an output (a dry run has none)."""
    if output_path is not None:
        check_output_path(input_path, output_path, overwrite)


def _refuse_ghost_configs(input_path, infos) -> None:
    """A ``.comfy_quant`` tensor without its layer's weight would be copied as a plain tensor into a
    file that every loader refuses: refuse the input instead, naming the layer."""
    for name in infos:
        if name.endswith(".comfy_quant") and f"{name[: -len('.comfy_quant')]}.weight" not in infos:
            layer = name[: -len(".comfy_quant")]
            raise InputFileError(f"{input_path}: {name} describes layer {layer}, but '{layer}.weight' is not in the file")


def _check_device(device: str) -> str:
    device = device or "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OptionError(f"--device: unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {device}: CUDA is not available in this torch build / machine")
    return str(dev)


def convert_file(input_path, output_path, options: PlanOptions | None = None, progress: Callable | None = None,
                 cancel: Callable[[], bool] | None = None, device: str = "cpu", overwrite: bool = False,
                 dry_run: bool = False, error_stats: bool = True, prefetch: int = 1,
                 calibration=None, advise: bool = False) -> ConversionReport:
    """Convert ``input_path`` to ``output_path`` following ``options``; see the module docstring."""
    options = options or PlanOptions()
    device = _check_device(device)
    sample_fraction(error_stats)
    t0 = time.monotonic()
    infos, metadata = read_header(input_path)
    _refuse_ghost_configs(input_path, infos)
    # planning reads the header only: a bad option is reported before an output that exists
    plans = make_plans(((i.name, i.shape, dtype_name(i.dtype)) for i in infos.values()), options)
    if not dry_run:
        check_paths(input_path, output_path, overwrite)
    calib = prepare_calibration(plans, calibration)
    input_specs = {n: i.spec for n, i in infos.items()}
    layout = OutputLayout(plans, input_specs, options, metadata)
    report = ConversionReport(input=os.fspath(input_path), output=None if dry_run else os.fspath(output_path),
                              dry_run=dry_run, device=device, layers=layer_records(plans, layout, input_specs))
    report.bytes_in = os.path.getsize(input_path)
    from .safetensors_writer import build_header

    header, _ = build_header(layout.specs, layout.metadata)
    report.bytes_out = len(header) + sum(s.nbytes for s in layout.specs.values())
    if dry_run:
        if advise:  # reads and test-quantizes every planned weight, hence opt-in
            from .rounding.advice import advise_file, format_advice

            report.advice = format_advice(advise_file(input_path, plans, calib))
        if calib is not None:
            calib.close()
        return report
    recs = {r.name: r for r in report.layers}
    total = sum(i.nbytes for i in infos.values())
    try:
        with SafetensorsReader(input_path) as reader, \
                AtomicSafetensorsWriter(output_path, layout.specs, layout.metadata, overwrite=overwrite) as writer:
            run_pipeline(plans, layout, reader, writer, recs, device, error_stats, progress, cancel, total, prefetch,
                          calib)
    finally:
        if calib is not None:
            calib.close()
    report.seconds = time.monotonic() - t0
    return report


def quantize_state_dict(state_dict: Mapping[str, torch.Tensor], options: PlanOptions | None = None,
                        progress: Callable | None = None, cancel: Callable[[], bool] | None = None,
                        device: str = "cpu", error_stats: bool = True, input_metadata: Mapping[str, str] | None = None,
                        calibration=None):
    """Quantize an in-memory state dict. Returns ``(new_state_dict, header_metadata, report)``.

    ``header_metadata`` is the safetensors ``__metadata__`` to save with it (``_quantization_metadata``
    when enabled, plus ``input_metadata``). Tensors that are not quantized are passed through (same
    objects, no copies). ``progress(done, total, name)`` / ``cancel()`` as in ``convert_file``.
    """
    options = options or PlanOptions()
    device = _check_device(device)
    sample_fraction(error_stats)
    t0 = time.monotonic()
    # ComfyUI 0.3.75 may carry the header string as a "_quantization_metadata" entry: not a tensor
    state_dict = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if (options.target_size is not None or options.target_bpw is not None) and options.layer_config is None:
        import dataclasses

        from .budget import budget_for_state_dict

        cfg, _ = budget_for_state_dict(state_dict, options, calibration)
        options = dataclasses.replace(options, layer_config=cfg)
    plans = make_plans(((k, tuple(v.shape), dtype_name(v.dtype)) for k, v in state_dict.items()), options)
    calib = prepare_calibration(plans, calibration)
    try:
        return _quantize_sd(state_dict, plans, options, calib, progress, cancel, device, error_stats, input_metadata, t0)
    finally:
        if calib is not None:
            calib.close()


def _quantize_sd(state_dict, plans, options, calib, progress, cancel, device, error_stats, input_metadata, t0):
    input_specs = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in state_dict.items()}
    layout = OutputLayout(plans, input_specs, options, input_metadata)
    report = ConversionReport(device=device, layers=layer_records(plans, layout, input_specs))
    recs = {r.name: r for r in report.layers}
    total = sum(s.nbytes for s in input_specs.values())
    out: dict[str, torch.Tensor] = {}
    done = 0
    for p in plans:
        if cancel is not None and cancel():
            raise Cancelled("quantization cancelled")
        t = state_dict[p.name]
        if p.quantized:
            q, err = quantize_layer(p, t.detach().to("cpu") if device == "cpu" else t.detach(), device, error_stats, calib)
            if err is not None:
                recs[p.name].rel_error, recs[p.name].error_fraction = err
            for k, v in q.items():
                out[f"{p.layer}.{k}"] = v
            cq = f"{p.layer}.comfy_quant"
            if cq in layout.comfy_quant:
                out[cq] = layout.comfy_quant[cq]
        else:
            out[p.name] = t
        done += input_specs[p.name].nbytes
        if progress is not None:
            progress(done, total, p.name)
    report.bytes_in = total
    report.bytes_out = sum(s.nbytes for s in layout.specs.values())
    report.seconds = time.monotonic() - t0
    return out, dict(layout.metadata), report


__all__ = ["convert_file", "quantize_state_dict", "plan_file", "plan_state_dict", "PlanOptions", "OutputLayout",
           "make_plans", "check_paths", "encode_comfy_quant", "comfy_quant_dict", "codec_opts", "relative_error"]
