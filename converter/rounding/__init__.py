"""How weights are rounded onto a format's grid.

``quantize_weight`` is the single entry point the converter (CLI and ComfyUI node) calls for every
layer. Methods (``METHODS``; ``METHOD_HELP`` has one line each for ``--help``):

- ``"rtn"``: round to nearest with the format's own scale choice (``--simple``).
- ``"default"``: data-free. Per scale block, the clipping range with the lowest weight error
  (``scale_search.py``); never worse than RTN on that objective. Costs a dozen extra RTN passes.
  FP8 grids (tensorwise/rowwise/blockwise FP8, MXFP8) keep RTN's scales: clipping them measured
  worse on real inputs, so for them "default" is RTN.
- ``"gptq"``: needs calibration statistics (``calibration.py``, CLI ``--calibration FILE``).
  Clipping search weighted by the input second moments, then GPTQ error-compensated rounding
  (``gptq.py``) under the full ``X^T X`` of the layer's real inputs. The candidate with the lowest
  calibration output error among GPTQ, clipped RTN and plain RTN is stored, so on the calibration set
  it is never worse than RTN. Layers whose statistics only hold the diagonal get the weighted clipping
  search alone.

``stats`` is the per-layer dict from ``calibration.CalibrationFile.stats_for`` (``xtx`` [N, N] and/or
``sqmean`` [N], ``absmax`` [N], ``count``). Measured effects are in ``bench/RESULTS_QUALITY.md``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..formats.base import Codec
from .gptq import gptq_round, output_error
from .scale_search import default_alphas, fake_quant, search_scales

METHODS = ("rtn", "default", "gptq")
DEFAULT_METHOD = "default"
CALIBRATED_METHOD = "gptq"
METHOD_HELP = {
    "rtn": "plain round-to-nearest with absmax scales (what --simple selects)",
    "default": "data-free: per-block clipping search on the weight error, never worse than RTN on it",
    "gptq": "calibrated (needs --calibration FILE): weighted clipping search + GPTQ error feedback",
}
# Options only the rounding methods read; stripped before the codec sees ``opts``.
_ROUNDING_OPTS = ("damp", "act_order", "block_size", "alphas", "device")


def _split(opts: dict) -> tuple[dict, dict]:
    ropts = {k: opts[k] for k in _ROUNDING_OPTS if k in opts}
    copts = {k: v for k, v in opts.items() if k not in _ROUNDING_OPTS}
    return ropts, copts


def quantize_weight(codec: Codec, weight: torch.Tensor, method: str = "rtn", stats: Mapping[str, torch.Tensor] | None = None, **opts) -> dict[str, torch.Tensor]:
    """Quantize one 2-D weight with ``codec``; returns the tensors to store (suffix -> tensor)."""
    if method == "rtn":
        return codec.quantize(weight, **opts)
    ropts, copts = _split(opts)
    if method == "default":
        if ropts.get("alphas") is None and default_alphas(codec) == (1.0,):
            return codec.quantize(weight, **copts)  # FP8 grids: RTN's scales (see scale_search.py)
        params, _ = search_scales(codec, weight, alphas=ropts.get("alphas"), **copts)
        return codec.quantize(weight, params=params, **copts)
    if method == "gptq":
        if stats is None:
            name = copts.get("name", "weight")
            raise ValueError(f"{name}: rounding method 'gptq' needs calibration statistics (--calibration FILE)")
        q, params = gptq_choose(codec, weight, stats, **ropts, **copts)
        return codec.quantize(q, params=params, **copts)
    raise ValueError(f"unknown rounding method {method!r}; known: {', '.join(METHODS)}")


def gptq_choose(codec: Codec, weight: torch.Tensor, stats: Mapping[str, torch.Tensor], *, damp: float = 0.01,
                act_order: bool = True, block_size: int = 128, alphas=None, device=None,
                return_info: bool = False, **opts):
    """The ``gptq`` method: returns ``(Q float32 on the grid, params)`` (and ``info`` if asked)."""
    w32 = weight.detach().to(torch.float32)
    h = stats.get("xtx")
    diag = torch.diagonal(h) if h is not None else stats.get("sqmean")
    if diag is None:
        raise ValueError(f"{opts.get('name', 'weight')}: calibration statistics hold neither 'xtx' nor 'sqmean'")
    diag = diag.to(device=w32.device, dtype=torch.float32)
    # Columns that never saw input still get a small weight so their clipping is not arbitrary.
    col_weight = diag + 1e-6 * float(diag.mean().clamp_min(1e-30))
    clip_params, sinfo = search_scales(codec, w32, col_weight=col_weight, alphas=alphas, **opts)
    if h is None:
        q = fake_quant(codec, w32, clip_params, **opts)
        info = {"choice": "clip" if not sinfo["used_rtn"] else "rtn", "search": sinfo}
        return (q, clip_params, info) if return_info else (q, clip_params)

    if device is None:  # where the converter put the weight (--device)
        device = w32.device
    hd = h.to(device=device, dtype=torch.float32)
    wd = w32.to(device)
    rtn_params = codec.scale_params(w32, **opts)
    cands = {"rtn": (fake_quant(codec, w32, rtn_params, **opts), rtn_params)}
    if not sinfo["used_rtn"]:
        cands["clip"] = (fake_quant(codec, w32, clip_params, **opts), clip_params)
    cands["gptq"] = (gptq_round(codec, w32, h, clip_params, damp=damp, block_size=block_size,
                                act_order=act_order, device=device, **opts), clip_params)
    errors = {k: output_error(wd, q.to(device), hd) for k, (q, _) in cands.items()}
    best = min(errors, key=errors.get)
    q, params = cands[best]
    if return_info:
        return q, params, {"choice": best, "errors": errors, "search": sinfo}
    return q, params


def calibrated_input_scale(codec: Codec, stats: Mapping[str, torch.Tensor] | None) -> float | None:
    """Static activation scale for the FP8 fast path: the largest input magnitude seen in
    calibration over the e4m3 range (``absmax / 448``), for ``float8_e4m3fn*`` layers; ``None``
    when the format has no ``input_scale`` or there are no statistics."""
    if stats is None or "absmax" not in stats or not codec.spec.input_scale:
        return None
    amax = float(stats["absmax"].to(torch.float32).max())
    if not amax > 0 or amax != amax or amax == float("inf"):
        return None
    return amax / 448.0


__all__ = ["METHODS", "DEFAULT_METHOD", "CALIBRATED_METHOD", "METHOD_HELP", "quantize_weight", "gptq_choose",
           "calibrated_input_scale"]
