"""Quantizing one planned layer for a conversion: codec + rounding method + transforms, then its error.

Shared by the streaming file conversion (``pipeline.py``) and the in-memory one
(``convert.quantize_state_dict``), so both write the same bytes for the same plan.
"""

from __future__ import annotations

import torch

from . import transforms as tfm
from .error_stats import relative_error, sample_fraction
from .errors import LayerError
from .formats import FormatError, get_codec
from .output_layout import codec_opts
from .plan import LayerPlan
from .rounding import quantize_weight


def prepare_calibration(plans: list[LayerPlan], calibration):
    """The rounding package's hook: checks that every calibrated layer has statistics (one error listing
    all that do not, before any work) and sets calibrated FP8 input scales. Returns the open file or None."""
    if calibration is None and not any(p.quantized and p.method == "gptq" for p in plans):
        return None
    from .rounding.calibration import prepare_calibration

    return prepare_calibration(plans, calibration)


def quantize_layer(p: LayerPlan, w: torch.Tensor, device: str, error_stats,
                  calib=None) -> tuple[dict[str, torch.Tensor], tuple[float, float] | None]:
    codec = get_codec(p.format)
    opts = codec_opts(p)
    wd = w.to(device, non_blocking=True) if device != "cpu" else w
    stats = calib.stats_for(p.layer, int(p.shape[1]), device=device) if calib is not None and p.method == "gptq" else None
    t = tfm.of(p.opts)
    if t and calib is not None and stats is None and calib.resolve(p.layer) is not None:
        stats = calib.stats_for(p.layer, int(p.shape[1]), device=device)  # the branch fit uses them
    try:
        if t:
            out = tfm.quantize(codec, wd, t, method=p.method, stats=stats, **opts)
        else:
            out = quantize_weight(codec, wd, method=p.method, stats=stats, **opts)
    except (FormatError, ValueError) as e:  # NonFiniteError is a FormatError; rounding raises ValueError
        raise LayerError(f"layer {p.layer} ({p.name}): {e}") from None
    sample = sample_fraction(error_stats)
    if sample is None:
        err = None
    elif t:
        dopts = {k: v for k, v in opts.items() if k != "dtype"}
        w32 = wd.to(torch.float32)
        d = tfm.decode(codec, out, p.shape, t, **dopts)
        err = (float((d - w32).norm() / w32.norm().clamp_min(1e-30)), 1.0)
    else:
        err = relative_error(codec, out, wd, p.shape, opts, sample=sample)
    if device != "cpu":
        out = {k: v.to("cpu") for k, v in out.items()}
    return out, err
