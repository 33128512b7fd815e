"""``int5_groupwise``: 5-bit symmetric integers, one float16 scale per 32 input weights (5.5 bits/weight).

Exact layout, packing and encoding: ``_intpack.py`` (shared with ``int6.py``). The step between NF4
(4.5 bits/weight) and 8-bit formats that budgets (``--target-size``) choose for medium-sensitive layers.
"""

from __future__ import annotations

from ._intpack import GroupIntCodec, group_int_spec

__all__ = ["Int5Groupwise"]
_SUMMARY = ("5-bit integers with a scale per 32 weights: about a third of bf16's size, clearly better than "
            "4-bit; one-pass Triton dequantize on NVIDIA SM 8.9+, torch dequantize elsewhere")


class Int5Groupwise(GroupIntCodec):
    bits = 5
    spec = group_int_spec(5, color="#3f9c8c", summary=_SUMMARY, advice=(("int6_groupwise", {"group_size": 32}),))
