"""``int5_groupwise``: 5-bit symmetric integers, one float16 scale per 32 input weights (5.5 bits/weight).

Exact layout, packing and encoding: ``_intpack.py`` (shared with ``int6.py``). The step between NF4
(4.5 bits/weight) and 8-bit formats that budgets (``--target-size``) choose for medium-sensitive layers.
"""

from __future__ import annotations

from ._intpack import GroupIntCodec
from .spec import FormatSpec, Variant

__all__ = ["Int5Groupwise"]


class Int5Groupwise(GroupIntCodec):
    bits = 5
    spec = FormatSpec(
        name="int5_groupwise", label="INT5", family="int5", color="#3f9c8c",
        summary="5-bit integers with a scale per 32 weights: about a third of bf16's size, clearly better "
                "than 4-bit; dequantized per call on every device",
        variants=(Variant("", "INT5 (5-bit, scale per 32 weights)", {"group_size": 32}),),
        storage="padded", clipping=True, custom=True, aliases=("int5", "5-bit", "5bit", "q5"),
        advice=(("int6_groupwise", {"group_size": 32}),),
        budget_steps=({"group_size": 32}, {"group_size": 64}, {"group_size": 128}))
