"""Per-layer relative error of a quantized weight: ``||W - dequant(Q)||_F / ||W||_F``.

Computed with the codec's own ``dequantize`` (what a consumer of the file computes), in float32, summed
in double across row chunks of ~1M weights (cache-sized). Measuring a weight costs about as much as
quantizing it (FP8 decoding by table, ``fp8.py``; torch's own float8 -> float32 cast is 5x slower), so
by default large row-separable layers are measured on a sample of their rows; every layer records the
fraction it was measured on, and the summary says so.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import OptionError

_ROW_PROBES = (1, 33, 257)
_row_split_cache: dict = {}


def row_split(codec, n: int, opts: dict) -> dict[str, bool] | None:
    """Which output tensors of ``codec`` are indexed by weight row, derived from ``output_specs`` alone:
    a tensor whose first dim equals M for every probe M (1, 33, 257) is per-row, one whose shape never
    changes is global (a tensorwise scale, a code book). Any other dependence on M (padding, swizzled or
    flattened layouts, row blocks) -> None: that layout cannot be cut into row chunks and is decoded whole."""
    key = (codec.name, n, tuple(sorted((k, repr(v)) for k, v in opts.items() if k != "name")))
    if key in _row_split_cache:
        return _row_split_cache[key]
    try:
        probes = [codec.output_specs((m, n), **opts) for m in _ROW_PROBES]
    except Exception:
        probes = None
    split: dict[str, bool] | None = {} if probes else None
    for suffix in (probes[0] if probes else {}):
        shapes = [tuple(p[suffix].shape) if suffix in p else None for p in probes]
        if all(s is not None and len(s) >= 1 and s[0] == m for s, m in zip(shapes, _ROW_PROBES)):
            split[suffix] = True
        elif all(s == shapes[0] for s in shapes):
            split[suffix] = False
        else:
            split = None
            break
    _row_split_cache[key] = split
    return split


# Default of --error-sample: large row-separable layers get their error measured on this fraction of
# their rows (evenly spaced chunks). Measuring all of them would cost about as much again as the
# quantization itself; a 1/8 sample of a >16M-weight layer is still >2M weights, so
# the estimate's own relative error is far below the differences between formats it is used to compare.
ERROR_SAMPLE = 0.125
ERROR_SAMPLE_MIN_ELEMS = 1 << 24


def relative_error(codec, out: Mapping[str, torch.Tensor], w: torch.Tensor, shape, opts: dict,
                   chunk_elems: int = 1 << 20, sample: float = 1.0) -> tuple[float, float]:
    """||W - dequant(Q)||_F / ||W||_F in float32 (accumulated in double across chunks).
    Returns ``(error, fraction of the weights it was measured on)``.

    Row-separable layouts (see ``row_split``: FP8/INT8 tensorwise and per-row; FP8/INT8 blockwise in
    chunks of whole tile rows) are dequantized in row chunks with the codec's own ``dequantize``, so no
    full-size float32 copy ever exists; with
    ``sample < 1`` and more than ``ERROR_SAMPLE_MIN_ELEMS`` weights only evenly spaced chunks covering
    that fraction of the rows are decoded. Other layouts are dequantized whole, always exactly."""
    # BNB's "dtype" option (the weight's original dtype) would collide with dequantize's output dtype
    dopts = {k: v for k, v in opts.items() if k != "dtype"}
    m, n = int(shape[0]), int(shape[1])
    rows = max(1, chunk_elems // max(1, n))
    split = row_split(codec, n, dopts) if m > rows else None
    bs = _tile_rows(codec, dopts) if split is None else None
    if bs is not None and m > max(bs, rows):
        # FP8/INT8 blockwise: chunks of whole tile rows; a tensor with one entry per weight row or per
        # tile row is cut with them, the rest (a 0-dim input_scale) is shared
        rows = max(bs, rows // bs * bs)
        split = {k: (1 if v.ndim and v.shape[0] == m else bs if v.ndim and v.shape[0] == -(-m // bs) else 0)
                 for k, v in out.items()}
    else:
        bs = None
    deq = None if split is not None else codec.dequantize(out, shape, torch.float32, **dopts)
    starts = list(range(0, m, rows))
    if split is not None and sample < 1.0 and m * n > ERROR_SAMPLE_MIN_ELEMS:
        k = max(2, -(-len(starts) * sample // 1))
        if k < len(starts):
            starts = [starts[round(x * (len(starts) - 1) / (k - 1))] for x in range(int(k))]
    covered = 0
    num = den = 0.0  # Python floats (double) across chunks; each chunk's norm is a float32 reduction
    for i in starts:
        j = min(m, i + rows)
        covered += j - i
        if deq is None and bs is not None:
            part = {k: (v[i // split[k]:-(-j // split[k])] if split[k] else v) for k, v in out.items()}
            d = codec.dequantize(part, (j - i, n), torch.float32, **dopts)
        elif deq is None:
            part = {k: (v[i:j] if split.get(k) else v) for k, v in out.items()}
            d = codec.dequantize(part, (j - i, n), torch.float32, **dopts)
        else:
            d = deq[i:j]
        ref = w[i:j].to(torch.float32)
        den += float(torch.linalg.vector_norm(ref)) ** 2
        num += float(torch.linalg.vector_norm(d.sub_(ref))) ** 2
        del d, ref
    del deq
    return ((num / den) ** 0.5 if den > 0 else 0.0), covered / m


def _tile_rows(codec, dopts: dict) -> int | None:
    """The tile height of a grid codec's tiled layout (FP8/INT8 blockwise), else None."""
    layout = getattr(codec, "layout", None)
    if layout is None:
        return None
    try:
        kind, bs = layout(dopts)
    except Exception:
        return None
    return bs if kind == "tile" and isinstance(bs, int) and bs > 0 else None


def sample_fraction(error_stats) -> float | None:
    """``error_stats``: False/None -> no statistics; True -> ERROR_SAMPLE; a float in (0, 1] -> that fraction."""
    if error_stats is None or error_stats is False:
        return None
    if error_stats is True:
        return ERROR_SAMPLE
    f = float(error_stats)
    if not 0 < f <= 1:
        raise OptionError(f"--error-sample must be in (0, 1], got {error_stats!r}")
    return f
