"""``int6_groupwise``: 6-bit symmetric integers, one float16 scale per 32 input weights (6.5 bits/weight).

Exact layout, packing and encoding: ``_intpack.py`` (shared with ``int5.py``).
"""

from __future__ import annotations

from ._intpack import GroupIntCodec, group_int_spec

__all__ = ["Int6Groupwise"]
_SUMMARY = ("6-bit integers with a scale per 32 weights: about 40% of bf16's size, close to 8-bit quality; "
            "one-pass Triton dequantize on NVIDIA SM 8.9+, torch dequantize elsewhere")


class Int6Groupwise(GroupIntCodec):
    bits = 6
    spec = group_int_spec(6, color="#5fb3a3", summary=_SUMMARY, advice=(("int8_tensorwise", {"per_row": True}),))
