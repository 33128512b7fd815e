"""Scale grids shared by the FP8 and INT8 layouts (no format of its own).

The FP8 (``fp8.py``) and INT8 (``int8.py``) layouts store the quantized weight unpadded at its logical
``[M, N]`` shape plus one float32 scale per block. They differ only in the value grid; the block
shapes are the same family, named here by a *kind*:

- ``"tensor"``: one scale, stored 0-dim ``[]`` (readers also accept ``[1]``, which older tools wrote).
- ``"row"``:    one scale per output row, stored ``[M]`` (FP8 rowwise).
- ``"row1"``:   one scale per output row, stored ``[M, 1]`` (INT8 per-row, broadcastable as is).
- ``"tile"``:   one scale per ``bs × bs`` tile, stored ``[ceil(M/bs), ceil(N/bs)]``; the last row and
  column of tiles may be partial (the weight itself is never padded).

Scales are ``amax / qmax`` computed in float32. A block whose amax is 0 (all-zero block) gets scale
1.0: any positive value dequantizes its zeros exactly, and 1.0 is what ComfyUI assumes for a missing
scale, so no reader divides by zero or produces NaN. The same 1.0 replaces a scale that underflows to 0
for a denormal amax (those elements then round to 0, an error below 1e-40).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Mapping

import torch

from .base import Codec, FormatError, NonFiniteError, TensorSpec, ceil_div, check_finite, check_shape, require

KINDS = ("tensor", "row", "row1", "tile")


def check_group_size(group_size) -> int:
    """Return ``group_size`` as a positive int, FormatError otherwise (it comes from files too)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise FormatError(f"group_size must be a positive integer, got {group_size!r}")
    return group_size


def grid_shape(kind: str, shape: tuple[int, int], bs: int = 0) -> tuple[int, ...]:
    m, n = shape
    if kind == "tensor":
        return ()
    if kind == "row":
        return (m,)
    if kind == "row1":
        return (m, 1)
    if kind == "tile":
        return (ceil_div(m, bs), ceil_div(n, bs))
    raise ValueError(kind)


def _absmax(w: torch.Tensor, dim=None) -> torch.Tensor:
    # max(max, -min) instead of abs().amax(): no |w|-sized temporary; aminmax reads ``w`` once for both
    # (half the memory traffic of amax + amin). Exact in any float dtype; NaN propagates (-> not finite).
    lo, hi = torch.aminmax(w) if dim is None else torch.aminmax(w, dim=dim)
    return torch.maximum(hi, -lo).to(torch.float32)


def grid_amax(kind: str, w: torch.Tensor, bs: int = 0) -> torch.Tensor:
    """float32 absolute maximum of each block of the 2-D ``w``, in ``grid_shape(kind, w.shape)``.

    Works on ``w`` in its own dtype without copying it (a layer can be hundreds of MiB).
    """
    w = w.detach()
    if w.element_size() == 1:  # fp8 inputs: reductions are not implemented for them everywhere
        w = w.to(torch.float32)
    if kind == "tensor":
        return _absmax(w)
    if kind == "row":
        return _absmax(w, 1)
    if kind == "row1":
        return _absmax(w, 1).reshape(-1, 1)
    if kind == "tile":
        m, n = w.shape
        gm, gn = grid_shape("tile", (m, n), bs)
        out = torch.empty((gm, gn), dtype=torch.float32, device=w.device)
        for i in range(gm):  # one band of bs rows at a time: only [N]-sized temporaries
            col = _absmax(w[i * bs:(i + 1) * bs], 0)
            if gn * bs != n:  # zero padding never raises an absolute maximum
                col = torch.nn.functional.pad(col, (0, gn * bs - n))
            out[i] = col.reshape(gn, bs).amax(dim=1)
        return out
    raise ValueError(kind)


def expand_grid(kind: str, scale: torch.Tensor, shape: tuple[int, int], bs: int = 0) -> torch.Tensor:
    """Broadcast a scale grid to the per-element float32 ``[M, N]`` multiplier (a view where possible)."""
    m, n = shape
    s = scale.to(torch.float32)
    if kind == "tensor":
        return s.reshape(()).expand(m, n)
    if kind in ("row", "row1"):
        return s.reshape(m, 1).expand(m, n)
    if kind == "tile":
        return s.repeat_interleave(bs, dim=0)[:m].repeat_interleave(bs, dim=1)[:, :n]
    raise ValueError(kind)


def apply_grid_(x: torch.Tensor, kind: str, scale: torch.Tensor, bs: int, op: str) -> torch.Tensor:
    """In place ``x / S`` (``op="div"``) or ``x * S`` (``op="mul"``) for the float32 ``[M, N]`` ``x``.

    Element for element the same IEEE operation as with ``expand_grid``, but tiles are handled one
    band of rows at a time so no ``[M, N]`` scale tensor is materialised.
    """
    fn = torch.Tensor.div_ if op == "div" else torch.Tensor.mul_
    m, n = x.shape
    s = scale.to(device=x.device, dtype=torch.float32)
    if kind != "tile":
        fn(x, expand_grid(kind, s, (m, n), bs))
        return x
    for i in range(s.shape[0]):
        fn(x[i * bs:(i + 1) * bs], s[i].repeat_interleave(bs)[:n])
    return x


# Rows per band of ``encode_rows`` on CPU: ~256K elements, so the band's float32 working copy (1 MiB)
# and its source and output stay in the L2 cache while the 3-4 elementwise passes run over it, and no
# weight-sized float32 temporary ever exists (that copy was the conversion's largest allocation).
BAND_ELEMS = 1 << 18


# Where ``quantize`` gets its CPU output tensor: ``torch.empty`` unless a caller installed an allocator
# (the streaming converter lends reusable buffers: a weight-sized fresh allocation costs one page fault
# per 4 KiB, more than the quantization's arithmetic). ``alloc(shape, dtype) -> tensor``.
_OUTPUT_ALLOC: contextvars.ContextVar = contextvars.ContextVar("hybridquant_output_alloc", default=None)


@contextlib.contextmanager
def output_allocator(alloc: Callable[[tuple, torch.dtype], torch.Tensor] | None):
    """Within the block (this thread/context), grid codecs take their CPU ``weight`` output from ``alloc``."""
    token = _OUTPUT_ALLOC.set(alloc)
    try:
        yield
    finally:
        _OUTPUT_ALLOC.reset(token)


def new_output(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    alloc = _OUTPUT_ALLOC.get()
    if alloc is None or device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    t = alloc(tuple(shape), dtype)
    if t.dtype != dtype or tuple(t.shape) != tuple(shape) or not t.is_contiguous():
        raise RuntimeError(f"output allocator returned {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
    return t


def band_rows(kind: str, shape: tuple[int, int], bs: int, device: torch.device) -> int:
    """Rows per band for ``encode_rows``: a multiple of ``bs`` for tiles; the whole weight on a GPU
    (one kernel per pass beats many small launches there)."""
    m, n = shape
    if device.type != "cpu":
        return m
    rows = max(1, BAND_ELEMS // max(1, n))
    if kind == "tile":
        rows = max(1, rows // bs) * bs
    return min(rows, m)


def grid_rows(kind: str, scale: torch.Tensor, i: int, j: int, bs: int) -> torch.Tensor:
    """The part of a scale grid that covers weight rows ``i:j`` (``i`` a multiple of ``bs`` for tiles)."""
    if kind == "tensor":
        return scale
    if kind in ("row", "row1"):
        return scale[i:j]
    if kind == "tile":
        return scale[i // bs:-(-j // bs)]
    raise ValueError(kind)


def encode_rows(codec: GridCodec, w: torch.Tensor, q: torch.Tensor, kind: str, scale: torch.Tensor, bs: int) -> None:
    """``q = encode(w / S)`` band by band of rows (see ``BAND_ELEMS``). Per element it is exactly the
    whole-tensor computation (float32 copy, IEEE division by the float32 scale tensor, the codec's
    rounding and saturation, cast): only the order in which rows are visited differs."""
    m, n = w.shape
    rows = band_rows(kind, (m, n), bs, w.device)
    buf = torch.empty((rows, n), dtype=torch.float32, device=w.device)
    for i in range(0, m, rows):
        j = min(m, i + rows)
        x = buf[:j - i]
        x.copy_(w[i:j])
        apply_grid_(x, kind, grid_rows(kind, scale, i, j, bs), bs, "div")
        codec.encode_into_(x, q[i:j])


def scales_from_amax(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``amax / qmax`` in float32, with 1.0 where that is 0 (see the module docstring)."""
    # Divide by a tensor on amax's device, not a Python float: CUDA turns division by a CPU scalar
    # into multiplication by its reciprocal, which is not correctly rounded and makes GPU scales
    # differ from CPU ones in the last bit.
    s = amax.to(torch.float32) / torch.tensor(qmax, dtype=torch.float32, device=amax.device)
    return torch.where(s > 0, s, torch.ones_like(s))


def check_amax(amax: torch.Tensor, expected: tuple[int, ...], name: str) -> torch.Tensor:
    """Validate a caller-supplied amax override (a clipping search passes one)."""
    if tuple(amax.shape) != tuple(expected):
        raise FormatError(f"{name}: amax override has shape {tuple(amax.shape)}, expected {tuple(expected)}")
    a = amax.to(torch.float32)
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise FormatError(f"{name}: amax override must be finite and non-negative")
    return a


def read_scale(layer: str, tensors, suffix: str, kind: str, shape: tuple[int, int], bs: int = 0) -> torch.Tensor:
    """Fetch and check a stored scale grid (float32, expected shape, finite), naming the layer."""
    if suffix not in tensors:
        raise FormatError(f"{layer}: missing tensor '{layer}.{suffix}'")
    t = tensors[suffix]
    if t.dtype != torch.float32:
        raise FormatError(f"{layer}.{suffix}: expected dtype torch.float32, found {t.dtype}")
    expected = grid_shape(kind, shape, bs)
    ok = tuple(t.shape) == expected or (kind == "tensor" and tuple(t.shape) == (1,))
    if not ok:
        raise FormatError(f"{layer}.{suffix}: expected shape {expected} for logical weight shape {tuple(shape)}"
                          f"{f' and group_size {bs}' if kind == 'tile' else ''}, found {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise FormatError(f"{layer}.{suffix}: contains NaN or Inf scales")
    return t


class GridCodec(Codec):
    """Common body of the FP8 and INT8 codecs: ``weight`` (storage dtype, ``[M, N]``) + ``weight_scale``.

    Subclasses set ``name``, ``storage`` (torch dtype), ``qmax`` (largest grid magnitude), implement
    ``encode_(x)`` (round the float32 ``x = w / S`` to the grid with saturation and cast to storage) and
    ``layout(opts, tensors)`` -> ``(kind, bs)``. Unknown options are ignored, so a layer's whole
    ``.comfy_quant`` dict (``format``, ``orig_dtype`` ...) can be passed back in.
    """

    storage: torch.dtype
    qmax: float

    # ---- subclass hooks -------------------------------------------------------------------------
    def layout(self, opts: dict, tensors: Mapping[str, torch.Tensor] | None = None) -> tuple[str, int]:
        raise NotImplementedError

    def encode_(self, x: torch.Tensor) -> torch.Tensor:
        """Round float32 ``x`` (which the callee may overwrite) to the grid, saturate, cast to storage."""
        raise NotImplementedError

    def encode_into_(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out[...] = encode_(x)``; subclasses override it to cast straight into ``out`` (no temporary)."""
        out.copy_(self.encode_(x))

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """The stored weight as a new float32 tensor (exactly ``q.to(float32)``; FP8 uses a lookup table)."""
        return q.to(torch.float32, copy=True)

    def extra_specs(self, opts: dict) -> dict[str, TensorSpec]:
        return {}

    def heuristic_reason(self, shape, opts):
        m, n = shape
        kind, bs = self.layout(dict(opts))
        if kind == "tile":
            if m % bs or n % bs:
                return f"heur: {m}x{n} not a multiple of block size {bs}"
        elif m % 16 or n % 16:
            return f"heur: {m}x{n} not a multiple of 16 (FP8/INT8 matmul)"
        return None

    def extra_outputs(self, w: torch.Tensor, opts: dict, name: str) -> dict[str, torch.Tensor]:
        return {}

    def validate_extra(self, layer: str, tensors: Mapping[str, torch.Tensor]) -> None:
        return None

    # ---- contract -------------------------------------------------------------------------------
    def output_specs(self, shape, **opts) -> dict[str, TensorSpec]:
        shape = check_shape(shape)
        kind, bs = self.layout(opts)
        specs = {"weight": TensorSpec(self.storage, shape),
                 "weight_scale": TensorSpec(torch.float32, grid_shape(kind, shape, bs))}
        specs.update(self.extra_specs(opts))
        return specs

    def block_amax(self, w: torch.Tensor, **opts) -> torch.Tensor:
        _check_2d(w, opts.get("name", "weight"))
        kind, bs = self.layout(opts)
        return grid_amax(kind, w, bs)

    def scale_params(self, w: torch.Tensor, amax: torch.Tensor | None = None, **opts) -> dict[str, torch.Tensor]:
        name = opts.get("name", "weight")
        _check_2d(w, name)
        kind, bs = self.layout(opts)
        if amax is None:
            amax = grid_amax(kind, w, bs)
            if not bool(torch.isfinite(amax).all()):  # NaN/Inf propagate into the block maxima
                raise_non_finite(w, name)
        else:
            amax = check_amax(amax, grid_shape(kind, tuple(w.shape), bs), name).to(w.device)
        return {"weight_scale": scales_from_amax(amax, self.qmax)}

    def element_scale(self, params: Mapping[str, torch.Tensor], shape, **opts) -> torch.Tensor:
        shape = check_shape(shape)
        kind, bs = self.layout(opts, params)
        return expand_grid(kind, params["weight_scale"], shape, bs)

    def round_to_grid(self, x: torch.Tensor, **opts) -> torch.Tensor:
        return self.decode(self.encode_(x.to(torch.float32, copy=True)))

    def quantize(self, w: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None, **opts) -> dict[str, torch.Tensor]:
        """Quantize a 2-D float weight. ``name=`` (default ``"weight"``) names ``w`` in error messages."""
        name = opts.get("name", "weight")
        _check_2d(w, name)
        shape = (int(w.shape[0]), int(w.shape[1]))
        kind, bs = self.layout(opts)
        if params is None:
            params = self.scale_params(w, **opts)  # checks finiteness on the way
        elif not bool(torch.isfinite(grid_amax("tensor", w)).all()):
            raise_non_finite(w, name)
        scale = read_scale(name, params, "weight_scale", kind, shape, bs)
        scale = scale.to(device=w.device).reshape(grid_shape(kind, shape, bs)).clone()
        q = new_output(shape, self.storage, w.device)
        encode_rows(self, w.detach(), q, kind, scale, bs)
        out = {"weight": q, "weight_scale": scale}
        out.update(self.extra_outputs(w, opts, name))
        return out

    def dequantize(self, tensors: Mapping[str, torch.Tensor], shape, dtype: torch.dtype = torch.float32, **opts) -> torch.Tensor:
        shape = check_shape(shape)
        kind, bs = self.layout(opts, tensors)
        x = self.decode(tensors["weight"])  # a new tensor, scaled in place below: never the caller's
        return apply_grid_(x, kind, tensors["weight_scale"], bs, "mul").to(dtype)

    def validate(self, layer: str, tensors: Mapping[str, torch.Tensor], shape, **opts) -> None:
        try:
            shape = check_shape(shape)
            kind, bs = self.layout(opts, tensors)
        except FormatError as e:
            raise FormatError(f"{layer}: {e}") from None
        require(layer, tensors, "weight", dtype=self.storage, shape=shape)
        read_scale(layer, tensors, "weight_scale", kind, shape, bs)
        self.validate_extra(layer, tensors)


def raise_non_finite(w: torch.Tensor, name: str) -> None:
    """Raise NonFiniteError with the NaN/Inf counts (only called once a cheap max/min probe failed:
    ``check_finite``'s full ``isfinite`` pass costs more than the whole quantization otherwise)."""
    check_finite(w, name)
    raise NonFiniteError(f"{name}: contains NaN or Inf values; refusing to quantize")


def _check_2d(w: torch.Tensor, name: str) -> None:
    if w.ndim != 2:
        raise FormatError(f"{name}: only 2-D weights are quantized, got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise FormatError(f"{name}: empty weight of shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise FormatError(f"{name}: expected a floating-point weight, got {w.dtype}")
