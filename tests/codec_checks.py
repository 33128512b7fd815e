"""Checks of the codec contract (``converter/formats/base.py``) that every format's tests run on their
own weights: the scale decomposition the rounding work relies on, and non-finite input refused with
the tensor named, with and without caller-supplied scales."""

from __future__ import annotations

import re

import pytest
import torch

from hybridquant.converter.formats.base import NonFiniteError


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def assert_rounding_contract(codec, w: torch.Tensor, **opts):
    """``round_to_grid(w / S) * S`` is the round trip, ``quantize(w, params=scale_params(w))`` stores
    the same bytes as ``quantize(w)``, and a weight already on the grid is stored bit-exactly.
    Returns ``(params, S, fake-quantized w)`` for the format's own further checks."""
    shape = tuple(w.shape)
    p = codec.scale_params(w, **opts)
    S = codec.element_scale(p, shape, **opts)
    assert S.dtype == torch.float32 and tuple(S.shape) == shape
    fq = codec.fake_quantize(w, **opts)
    assert torch.equal(codec.round_to_grid(w.float() / S, **opts) * S, fq)
    qa, qb = codec.quantize(w, **opts), codec.quantize(w, params=p, **opts)
    assert qa.keys() == qb.keys() and all(torch.equal(_bytes(qa[k]), _bytes(qb[k])) for k in qa)
    assert torch.equal(codec.dequantize(codec.quantize(fq, params=p, **opts), shape, **opts), fq)
    return p, S, fq


def assert_non_finite_refused(codec, bad: torch.Tensor, good: torch.Tensor, name: str, **opts) -> None:
    """``bad`` (holding NaN/Inf) is refused naming ``name``, also with the scales of ``good`` given."""
    said = re.escape(name) + ": contains"
    with pytest.raises(NonFiniteError, match=said):
        codec.quantize(bad, name=name, **opts)
    params = codec.scale_params(good, **opts)  # caller-supplied scales: the weight is still checked
    with pytest.raises(NonFiniteError, match=said):
        codec.quantize(bad, params=params, name=name, **opts)
