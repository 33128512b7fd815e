"""What the per-layer benches share: the GPU timer and a stand-in for a HybridQuant Linear.

The benches run without ComfyUI, so they time ``linear_paths.run`` on ``LayerShim``: exactly the
per-call dispatch a loaded layer uses, with the attributes it reads and nothing else.
"""

from __future__ import annotations

import torch

from hybridquant.converter.formats import get_codec


def bench(fn) -> float:
    """Median milliseconds of ``fn`` on the GPU (Triton's timer: warm-up, L2 flush between runs)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def rel_err(y, ref) -> float:
    return float((y.float() - ref).norm() / ref.norm())


class LayerShim:
    """The attributes ``linear_paths.run`` reads from a HybridQuant Linear."""

    def __init__(self, fmt, n, k, bnb=None, opts=None):
        self.hq_format, self.out_features, self.in_features = fmt, n, k
        self.hq_paths, self.hq_fp_mm, self.hq_name = {}, False, f"bench {fmt}"
        self.hq_static_input_scale, self.hq_bnb, self.hq_opts = None, bnb, opts or {}
        if bnb is not None and "nested_offset" in bnb:  # bitsandbytes adds it on the GPU (layers.py)
            self.hq_bnb_offset = torch.tensor(float(bnb["nested_offset"]), device="cuda")

    def hq_dequantize(self, tensors, dtype):  # the fallback path, if the layer takes it
        return get_codec(self.hq_format).dequantize(tensors, (self.out_features, self.in_features), dtype,
                                                    **self.hq_opts)
