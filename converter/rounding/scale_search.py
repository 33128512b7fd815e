"""Error-aware choice of the clipping range per scale block (the data-free default rounding).

Round-to-nearest (RTN) scales every block so that its absolute maximum lands exactly on the largest
grid value. That wastes grid resolution on one outlier: for a 4-bit grid, shrinking the range of a
block by 10-30% and saturating its largest element often lowers the block's squared error, because
every other element gets a finer grid. The same holds, less strongly, for INT8 with a single scale.

``search_scales`` tries a fixed list of shrink factors ``alpha`` (1.0 always included) for every
block at once, measures each block's (optionally column-weighted) squared error
``sum_j c_j (w_ij - q_ij)^2`` through the codec decomposition (``scale_params(w, amax=alpha*amax)``,
``element_scale``, ``round_to_grid``), and keeps per block the factor with the lowest error. The
combined choice is evaluated once more with the codec's real scale computation (two-level scales
such as NVFP4's global scale or bitsandbytes' nested absmax make blocks interact slightly) and, if it
is not strictly better than RTN on the same objective, RTN's scales are returned. So the result is
never worse than RTN on its own objective, by construction.

Column weights ``c_j``: none (plain weight MSE, the data-free default) or the input second moment
``E[x_j^2]`` (the diagonal of the calibration Hessian proxy), which makes the error estimate the
expected output error of a layer whose inputs are uncorrelated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..formats.base import Codec
from .blocks import BlockMap

# Uniform grids (4-bit, INT8) gain most from clipping. FP8 grids are logarithmic: the relative error
# of an element hardly depends on the scale, so clipping can only trade the error of the largest
# weights for slightly finer small ones. Measured on MiniLM (bench/bench_quality.py), FP8 tensorwise
# clipping that lowered weight MSE by >= 2% in some layers made the held-out embedding error 1.4%
# WORSE (the largest weights feed outlier features that matter most), so FP8 grids keep RTN's scales
# in the data-free default; with calibration data GPTQ is what helps them.
ALPHAS_FINE = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
ALPHAS_FP8 = (1.0,)
REFINE = (0.0125,)
# A block keeps RTN's scale unless clipping lowers its error by at least this fraction. Tiny gains on
# the weight-space proxy are noise with respect to the output error (measured: FP8 tensorwise on
# MiniLM got 1.5% WORSE held-out error from a 0.x% weight-MSE gain); real gains on 4-bit/INT8 blocks
# are 5-50%.
MIN_GAIN = 0.02


def default_alphas(codec: Codec) -> tuple[float, ...]:
    if codec.spec.clipping:
        return ALPHAS_FINE
    return ALPHAS_FP8


def fake_quant(codec: Codec, w32: torch.Tensor, params: Mapping[str, torch.Tensor], **opts) -> torch.Tensor:
    """``round_to_grid(w / S) * S`` in float32, 0 where ``S`` is 0 (all-zero blocks)."""
    s = codec.element_scale(params, tuple(w32.shape), **opts).to(w32.device)
    # S == 0 only in all-zero blocks, whose elements are 0: 0 / tiny = 0, and q * 0 = 0.
    x = w32 / s.clamp_min(torch.finfo(torch.float32).tiny)
    return codec.round_to_grid(x, **opts).mul_(s)


def weighted_error(w32: torch.Tensor, q: torch.Tensor, col_weight: torch.Tensor | None) -> torch.Tensor:
    """Per-element ``c_j (w_ij - q_ij)^2``."""
    e = (w32 - q).square_()
    if col_weight is not None:
        e.mul_(col_weight.reshape(1, -1))
    return e


def search_scales(codec: Codec, w: torch.Tensor, col_weight: torch.Tensor | None = None,
                  alphas: Sequence[float] | None = None, min_gain: float = MIN_GAIN, **opts) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(params, info)``: scale params for ``codec.quantize(w, params=...)`` and a summary.

    Search: every factor of ``alphas`` for every block, then (default list only) each block's best
    factor ``+- REFINE``. Measured on MiniLM: a coarse-to-fine search (1, .9, .8, .7 then +-.05,
    +-.025; 9 round trips) was as good for INT8 but clearly worse for NVFP4 (0.946 vs 0.897 x RTN
    error): NVFP4's e4m3 block scales make the error jagged in alpha, so the full list is kept.

    ``info`` holds ``rtn_error`` and ``error`` (the objective for RTN's and the chosen scales),
    ``used_rtn`` and ``mean_alpha``.
    """
    w32 = w.detach().to(torch.float32)
    if col_weight is not None:
        col_weight = col_weight.to(device=w32.device, dtype=torch.float32)
    explicit = alphas is not None
    alphas = tuple(alphas) if explicit else default_alphas(codec)
    alphas = (1.0,) + tuple(a for a in alphas if a != 1.0)
    rtn_params = codec.scale_params(w32, **opts)
    if len(alphas) == 1:
        err = float(weighted_error(w32, fake_quant(codec, w32, rtn_params, **opts), col_weight).sum())
        return dict(rtn_params), {"rtn_error": err, "error": err, "used_rtn": True, "mean_alpha": 1.0}
    bmap = BlockMap.probe(codec, tuple(w32.shape), device=w32.device, **opts)
    amax = codec.block_amax(w32, **opts).to(torch.float32)

    def block_err(params):
        return bmap.reduce_sum(weighted_error(w32, fake_quant(codec, w32, params, **opts), col_weight))

    rtn_err = block_err(rtn_params)  # RTN's own scales (== alpha 1 for every codec here)
    rtn_err_total = float(rtn_err.sum())
    bar = rtn_err * (1.0 - min_gain)
    best_err, best_alpha = rtn_err.clone(), torch.ones_like(rtn_err)

    def consider(alpha_grid: torch.Tensor) -> None:
        nonlocal best_err, best_alpha
        params = codec.scale_params(w32, amax=amax * alpha_grid.reshape(amax.shape), **opts)
        err = block_err(params)
        better = (err < best_err) & (err <= bar)
        best_err = torch.where(better, err, best_err)
        best_alpha = torch.where(better, alpha_grid, best_alpha)

    for a in alphas[1:]:
        consider(torch.full_like(rtn_err, a))
    if not explicit and alphas == ALPHAS_FINE:
        for step in REFINE:
            base = best_alpha.clone()
            for d in (-step, step):
                cand = (base + d).clamp(min=0.5, max=1.0)
                if bool((cand != base).any()):
                    consider(cand)

    if bool((best_alpha == 1.0).all()):
        return dict(rtn_params), {"rtn_error": rtn_err_total, "error": rtn_err_total, "used_rtn": True,
                                  "mean_alpha": 1.0}
    params = codec.scale_params(w32, amax=amax * best_alpha.reshape(amax.shape), **opts)
    err_total = float(weighted_error(w32, fake_quant(codec, w32, params, **opts), col_weight).sum())
    info = {"rtn_error": rtn_err_total, "error": err_total, "used_rtn": False,
            "mean_alpha": float(best_alpha.float().mean())}
    if not err_total < rtn_err_total:  # two-level scales made the combination worse: keep RTN
        params, info["error"], info["used_rtn"], info["mean_alpha"] = rtn_params, rtn_err_total, True, 1.0
    return dict(params), info
