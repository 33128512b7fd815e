"""The cuBLAS blocked scale layout against comfy-kitchen's reference and the index formula."""

import pytest
import torch
from comfy_kitchen.float_utils import from_blocked as ck_from_blocked
from comfy_kitchen.float_utils import to_blocked as ck_to_blocked

from hybridquant.converter.formats.base import FormatError
from hybridquant.converter.formats.blocked_layout import blocked_shape, from_blocked, to_blocked


@pytest.mark.parametrize("rows,cols", [(1, 1), (32, 1), (128, 4), (130, 5), (256, 8), (300, 129)])
def test_matches_comfy_kitchen_and_inverts(rows, cols):
    s = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
    b = to_blocked(s)
    assert tuple(b.shape) == blocked_shape(rows, cols)
    assert torch.equal(b, ck_to_blocked(s, flatten=False))
    assert torch.equal(from_blocked(b, rows, cols), s)
    assert torch.equal(from_blocked(b, rows, cols), ck_from_blocked(b, rows, cols))


def test_index_formula_of_docstring():
    rows, cols = 256, 8
    s = torch.arange(rows * cols, dtype=torch.int32).reshape(rows, cols)
    flat = to_blocked(s).reshape(-1)
    for tr in range(2):
        for tc in range(2):
            tile = flat[(tr * 2 + tc) * 512 : (tr * 2 + tc + 1) * 512].reshape(32, 4, 4)
            for j in (0, 5, 31):
                for i in range(4):
                    for k in range(4):
                        assert tile[j, i, k] == s[tr * 128 + 32 * i + j, tc * 4 + k]


def test_float8_dtype_and_bad_size():
    s = torch.rand(33, 3).to(torch.float8_e4m3fn)
    b = to_blocked(s)
    assert b.dtype == torch.float8_e4m3fn
    assert torch.equal(from_blocked(b, 33, 3).view(torch.uint8), s.view(torch.uint8))
    with pytest.raises(FormatError, match="blocked scale storage"):
        from_blocked(b[:64], 33, 3)
