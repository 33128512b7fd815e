"""Transforms around any codec: the low-rank branch (``lowrank.py``) and the Hadamard rotation
(``rotation.py``). Not formats: a layer of any quantized format may carry them.

In ``.comfy_quant`` (and the header entry) of a layer: ``"svd_rank": R`` (tensors ``<layer>.svd_up``
[M, R], ``<layer>.svd_down`` [R, N], bfloat16) and/or ``"rotation": {"kind": "hadamard", "block": B}``.
bitsandbytes 4-bit layers that use them get a ``.comfy_quant`` entry too (format ``bnb_nf4``/``bnb_fp4``,
the transforms, ``orig_shape``) beside their own quant-state keys.

Definitions (the decoded weight and what a layer computes; exactness tests check both):

    decoded = dequant(weight) · H + svd_up @ svd_down           (H = I without rotation)
    y       = q_linear(rotate(x)) + (x @ svd_down.T) @ svd_up.T  (= x @ decoded.T)

Fitting (``quantize``), with the metric ``||(W - decoded) L||`` (``L Lᵀ`` = the calibration ``XᵀX`` when
there is one, else the identity: data-free weight error):
1. branch = best rank-R fit of ``W`` (bf16-rounded, exactly what is stored);
2. residual ``(W - branch) · H`` quantized by the codec with the layer's rounding method (its calibration
   statistics rotated the same way, so GPTQ sees the inputs the quantized matmul sees);
3. branch refit to ``W - dequant(Q) · H`` (the best branch for that Q), and steps 2-3 once more;
   the (Q, branch) pair with the lower error is stored.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import lowrank, rotation
from .formats.base import Codec, TensorSpec

KEYS = ("svd_rank", "rotation")
TENSORS = ("svd_up", "svd_down")
ROUNDS = 2


def of(opts: Mapping) -> dict:
    """The transforms among a layer's options / metadata (``{}``: none)."""
    return {k: opts[k] for k in KEYS if opts.get(k) is not None}


def strip(opts: Mapping) -> dict:
    """The options without the transforms (what the codec sees)."""
    return {k: v for k, v in opts.items() if k not in KEYS}


def resolve(t: Mapping, shape: tuple[int, int], where: str) -> dict:
    """Concrete, validated transforms of a layer of logical ``shape`` (default rotation block filled in)."""
    out = {}
    if t.get("svd_rank") is not None:
        out["svd_rank"] = lowrank.check_rank(t["svd_rank"], shape, where)
    rot = t.get("rotation")
    if rot is not None:
        rot = dict(rot)
        if rot.get("block") is None:
            rot["block"] = rotation.default_block(int(shape[1]))
        out["rotation"] = rotation.check(rot, int(shape[1]), where)
    return out


def output_specs(shape: tuple[int, int], t: Mapping) -> dict[str, TensorSpec]:
    return lowrank.output_specs(shape, int(t["svd_rank"])) if t.get("svd_rank") else {}


def block_of(t: Mapping) -> int | None:
    rot = t.get("rotation")
    return int(rot["block"]) if rot else None


def rotate_stats(stats: Mapping[str, torch.Tensor] | None, block: int | None):
    """Calibration statistics of the rotated inputs (``absmax`` is dropped: it is not rotation-invariant)."""
    if stats is None or block is None:
        return stats
    out = {k: v for k, v in stats.items() if k not in ("xtx", "sqmean", "absmax")}
    if "xtx" in stats:
        out["xtx"] = rotation.rotate_gram(stats["xtx"].to(torch.float32), block)
    if "sqmean" in stats:
        out["sqmean"] = rotation.rotate_sqmean(stats["sqmean"], block)
    return out


def gram_of(stats: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
    if stats is None:
        return None
    return stats.get("xtx", stats.get("sqmean"))


def _err(e: torch.Tensor, gram: torch.Tensor | None) -> float:
    if gram is None:
        return float(e.square().sum())
    g = gram.to(device=e.device, dtype=torch.float32)
    if g.ndim == 1:
        return float((e.square() * g).sum())
    return float(((e @ g) * e).sum())


def core_dequant(codec: Codec, tensors: Mapping[str, torch.Tensor], shape, t: Mapping, **opts) -> torch.Tensor:
    """``dequant(weight) · H`` in float32 (the decoded weight without the branch)."""
    # (bitsandbytes' "dtype" option is the original dtype, not dequantize's output dtype)
    opts = {k: v for k, v in strip(opts).items() if k != "dtype"}
    w = codec.dequantize(tensors, tuple(shape), torch.float32, **opts)
    b = block_of(t)
    return rotation.rotate(w, b) if b else w


def decode(codec: Codec, tensors: Mapping[str, torch.Tensor], shape, t: Mapping,
           dtype: torch.dtype = torch.float32, **opts) -> torch.Tensor:
    """The decoded weight of a transformed layer (see the module docstring)."""
    w = core_dequant(codec, tensors, shape, t, **opts)
    if t.get("svd_rank"):
        w += lowrank.product(tensors["svd_up"].to(w.device), tensors["svd_down"].to(w.device))
    return w.to(dtype)


def to_core(w: torch.Tensor, tensors: Mapping[str, torch.Tensor], t: Mapping) -> torch.Tensor:
    """The weight the codec must store so that the layer decodes to ``w``: ``(w - branch) · H``."""
    w = w.to(torch.float32)
    if t.get("svd_rank"):
        w = w - lowrank.product(tensors["svd_up"].to(w.device), tensors["svd_down"].to(w.device))
    b = block_of(t)
    return rotation.rotate(w, b) if b else w


def quantize(codec: Codec, w: torch.Tensor, t: Mapping, method: str = "rtn",
             stats: Mapping[str, torch.Tensor] | None = None, **opts) -> dict[str, torch.Tensor]:
    """Quantize one weight with its transforms; returns every tensor to store (codec's + branch)."""
    from .rounding import quantize_weight

    w32 = w.detach().to(torch.float32)
    shape = (int(w32.shape[0]), int(w32.shape[1]))
    copts = strip(opts)
    b = block_of(t)
    rank = int(t.get("svd_rank") or 0)
    gram = gram_of(stats)
    qstats = rotate_stats(stats, b)
    if method == "rtn" or method == "default":
        qstats = None

    def quant(target):
        return quantize_weight(codec, rotation.rotate(target, b) if b else target, method=method,
                               stats=qstats if method == "gptq" else None, **copts)

    if not rank:
        return quant(w32)
    up, down = lowrank.stored(*lowrank.fit(w32, rank, gram))
    best = None
    for _ in range(ROUNDS):
        q = quant(w32 - lowrank.product(up, down))
        core = core_dequant(codec, q, shape, t, **copts)
        up, down = lowrank.stored(*lowrank.fit(w32 - core, rank, gram))
        err = _err(w32 - core - lowrank.product(up, down), gram)
        if best is None or err < best[0]:
            best = (err, q, up, down)
    _, q, up, down = best
    return {**q, "svd_up": up, "svd_down": down}
