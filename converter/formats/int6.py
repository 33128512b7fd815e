"""``int6_groupwise``: 6-bit symmetric integers, one float16 scale per 32 input weights (6.5 bits/weight).

Exact layout, packing and encoding: ``_intpack.py`` (shared with ``int5.py``).
"""

from __future__ import annotations

from ._intpack import GroupIntCodec
from .spec import FormatSpec, Variant

__all__ = ["Int6Groupwise"]


class Int6Groupwise(GroupIntCodec):
    bits = 6
    spec = FormatSpec(
        name="int6_groupwise", label="INT6", family="int6", color="#5fb3a3",
        summary="6-bit integers with a scale per 32 weights: about 40% of bf16's size, close to 8-bit "
                "quality; dequantized per call on every device",
        variants=(Variant("", "INT6 (6-bit, scale per 32 weights)", {"group_size": 32}),),
        storage="padded", clipping=True, custom=True, aliases=("int6", "6-bit", "6bit", "q6"),
        advice=(("int8_tensorwise", {"per_row": True}),),
        budget_steps=({"group_size": 32}, {"group_size": 64}, {"group_size": 128}))
