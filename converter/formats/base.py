"""The contract every format module in ``converter/formats/`` fulfils.

Every quantized layout this pack reads or writes is described by one module holding one ``Codec``
subclass. A codec is stateless: options come in as keyword arguments whose names are the keys of the
layer's ``.comfy_quant`` dict (``group_size``, ``per_row``, ...), so the metadata of a file can be
splatted straight back into ``dequantize``/``validate``.

Vocabulary
----------
- *layer*: the state-dict prefix of a linear layer, e.g. ``double_blocks.0.img_attn.qkv``.
- *suffix*: a key relative to the layer, e.g. ``weight``, ``weight_scale``, ``weight.absmax``. Every
  tensor a codec writes or reads is named ``f"{layer}.{suffix}"``. ``comfy_quant`` is written by
  ``converter.metadata``, never by a codec.
- *logical shape*: the ``(M, N) = (out_features, in_features)`` shape of the float weight. Storage may
  be padded or packed; the logical shape always comes from the caller (module / ``orig_shape``).
- *scale grid*: the shape of the per-block statistics of a format: ``()`` tensorwise, ``(M,)`` FP8
  rowwise, ``(M, 1)`` INT8 per-row, ``(ceil(M/bs), ceil(N/bs))`` 2-D blocks, ``(M, ceil(N/32))``
  MXFP8, ``(M, ceil(N/16))`` NVFP4, ``(ceil(M*N/bs),)`` bitsandbytes.

Decomposition used by the rounding work (``converter/rounding``)
----------------------------------------------------------------
Every format here represents ``w[i, j] ≈ S[i, j] * g`` where ``S`` is a per-element scale that is
constant over a block and ``g`` is a value of a fixed grid (the e4m3 values, the integers -127..127,
the E2M1 values, the NF4 code book ...). Codecs expose that split so GPTQ-style rounding and
clipping searches work for every format with one implementation:

- ``block_amax(w, **opts)`` -> the absolute maximum per block, in the scale-grid shape.
- ``scale_params(w, amax=None, **opts)`` -> the scale tensors exactly as ``quantize`` would store
  them (before any storage swizzle), computed from ``amax`` when given (a clipping search passes a
  shrunken amax) or from ``block_amax(w)`` otherwise. Returned scales are already representable in
  the format (E8M0 powers of two, e4m3 block scales, nested-quantized absmax ...).
- ``element_scale(params, shape, **opts)`` -> float32 ``[M, N]``: the per-element multiplier ``S``.
- ``round_to_grid(x, **opts)`` -> nearest representable grid value of ``x = w / S`` (float32), with
  the format's saturation. ``round_to_grid(w / S) * S`` is exactly ``dequantize(quantize(w))`` when
  both use the same ``params``.
- ``quantize(w, params=None, **opts)`` with ``params`` from ``scale_params``: quantizes with those
  scales instead of recomputing them (so a weight that GPTQ already put on the grid is stored
  bit-exactly).

I/O contract
------------
- ``output_specs(shape, **opts)`` -> ``{suffix: TensorSpec}``: the exact keys, dtypes and shapes that
  ``quantize`` returns for a weight of logical ``shape``. The streaming writer computes the whole
  output header from these before any data exists, so they must agree with ``quantize`` exactly.
- ``quantize(w, params=None, **opts)`` -> ``{suffix: tensor}`` on ``w``'s device. ``w`` may be any
  float dtype on CPU or CUDA. Non-finite values raise ``NonFiniteError``.
- ``dequantize(tensors, shape, dtype=torch.float32, **opts)`` -> the float weight ``[M, N]``.
- ``validate(layer, tensors, shape, **opts)`` raises ``FormatError`` naming the layer and the problem
  (missing tensor, wrong dtype or shape, packed size not matching ``shape``).
- ``metadata(**opts)`` -> the ``.comfy_quant`` dict for a layer (``{"format": name, ...}``), or
  ``None`` for layouts that carry their own serialization (bitsandbytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .spec import FormatSpec


class FormatError(ValueError):
    """A quantized layer's data does not match its declared format. The message names the layer."""


class NonFiniteError(FormatError):
    """A weight to quantize contains NaN or Inf."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def check_shape(shape) -> tuple[int, int]:
    """A logical ``(M, N)`` as two positive ints; FormatError otherwise (shapes come from files too)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0:
        raise FormatError(f"expected a 2-D logical weight shape with positive sizes, got {shape}")
    return shape  # type: ignore[return-value]


def check_finite(w: torch.Tensor, name: str = "weight") -> None:
    """Raise NonFiniteError if ``w`` has NaN/Inf. One reduction, no copy of ``w``.

    A float32 sum is finite only if every element is finite (any NaN, or Inf of either sign, makes
    it NaN/Inf), so the common all-finite case costs one streaming pass with no ``|w|``-sized
    temporary. Only when the sum is not finite (bad values, or a genuine float32 overflow of huge
    weights) do we pay for the exact elementwise check.
    """
    if not w.is_floating_point() or w.numel() == 0:
        return
    if bool(torch.isfinite(w.sum(dtype=torch.float32))):
        return
    if not bool(torch.isfinite(w).all()):
        n_nan = int(torch.isnan(w).sum())
        n_inf = int(torch.isinf(w).sum())
        raise NonFiniteError(f"{name}: contains {n_nan} NaN and {n_inf} Inf values; refusing to quantize")


def require(layer: str, tensors: Mapping[str, torch.Tensor], suffix: str, dtype=None, shape=None) -> torch.Tensor:
    """Fetch ``tensors[suffix]`` and check dtype/shape, raising FormatError that names the layer."""
    if suffix not in tensors:
        raise FormatError(f"{layer}: missing tensor '{layer}.{suffix}'")
    t = tensors[suffix]
    if dtype is not None and t.dtype != dtype:
        raise FormatError(f"{layer}.{suffix}: expected dtype {dtype}, found {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise FormatError(f"{layer}.{suffix}: expected shape {tuple(shape)}, found {tuple(t.shape)}")
    return t


class Codec:
    """Base class; see the module docstring for the contract. Subclasses set ``spec`` (``spec.py``)."""

    spec: FormatSpec

    @property
    def name(self) -> str:
        return self.spec.name

    def logical_shape(self, stored: tuple[int, ...], meta: Mapping | None = None) -> tuple[int, int] | None:
        """The logical ``(M, N)`` of a layer from its stored ``weight`` shape when the file does not say
        (no ``orig_shape``). Exact layouts: the stored shape. Padded/flat layouts: None unless the
        codec overrides this with a documented best guess; the module's own shape is what loading
        validates against in the end."""
        if self.spec.storage == "exact" and len(stored) == 2:
            return (int(stored[0]), int(stored[1]))
        return None

    def heuristic_reason(self, shape: tuple[int, int], opts: Mapping) -> str | None:
        """Why ``--heur`` keeps a layer of ``shape`` out of this format (None: fine). Generic rules
        live in ``converter.presets``; a codec adds the ones of its own layout."""
        why = self.shape_reason(shape, opts)
        return f"heur: {why}" if why else None

    def shape_reason(self, shape: tuple[int, int], opts: Mapping) -> str | None:
        """Why this format cannot store a layer of ``shape`` at all (None: it can). The planner keeps
        such a layer in high precision with this reason, whatever rule chose the format
        (``converter.plan``), so one narrow layer does not stop a whole conversion."""
        return None

    def output_specs(self, shape: tuple[int, int], **opts) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def block_amax(self, w: torch.Tensor, **opts) -> torch.Tensor:
        raise NotImplementedError

    def scale_params(self, w: torch.Tensor, amax: torch.Tensor | None = None, **opts) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def element_scale(self, params: Mapping[str, torch.Tensor], shape: tuple[int, int], **opts) -> torch.Tensor:
        raise NotImplementedError

    def round_to_grid(self, x: torch.Tensor, **opts) -> torch.Tensor:
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None, **opts) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantize(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype = torch.float32, **opts) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, layer: str, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int], **opts) -> None:
        raise NotImplementedError

    def metadata(self, **opts) -> dict | None:
        return {"format": self.name}

    def fake_quantize(self, w: torch.Tensor, **opts) -> torch.Tensor:
        """Round trip in float32 (quantize then dequantize): what a consumer of the file computes with."""
        tensors = self.quantize(w, **opts)
        return self.dequantize(tensors, tuple(w.shape), torch.float32, **opts)
