"""The shared codec helpers in converter/formats/base.py."""

import pytest
import torch

from hybridquant.converter.formats import FORMAT_NAMES, FormatError, get_codec
from hybridquant.converter.formats.base import NonFiniteError, TensorSpec, check_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_finite_names_tensor_and_counts(bad, dtype):
    w = torch.randn(33, 17).to(dtype)
    w[3, 4] = bad
    with pytest.raises(NonFiniteError, match=r"blocks\.0\.w: contains"):
        check_finite(w, "blocks.0.w")


def test_check_finite_opposite_infinities_and_float32_overflow():
    w = torch.zeros(8)
    w[0], w[1] = float("inf"), -float("inf")  # sum is NaN, not Inf
    with pytest.raises(NonFiniteError, match="0 NaN and 2 Inf"):
        check_finite(w)
    # A float32 sum that overflows although every value is finite is not an error.
    check_finite(torch.full((4, 4), 3e38))
    check_finite(torch.empty(0))


def test_registry_knows_every_format_and_rejects_unknown():
    for name in FORMAT_NAMES:
        assert get_codec(name).name == name
    with pytest.raises(FormatError, match="unknown quantization format 'float9'"):
        get_codec("float9")


def test_tensorspec_nbytes():
    assert TensorSpec(torch.float8_e4m3fn, (3, 5)).nbytes == 15
    assert TensorSpec(torch.float32, ()).nbytes == 4
