"""Block-scaled MXFP8 matmul for NVIDIA SM >= 10.0 (Blackwell), torch >= 2.10.

``mx_linear(x, w, w_scale, shape, bias)``: ``w`` is the stored e4m3 weight padded to
``[roundup(M,32), roundup(N,32)]`` with its E8M0 scales in cuBLAS' blocked layout (exactly what the
``mxfp8`` / ``hybrid_mxfp8`` codecs store, so nothing is converted at load). Activations are quantized
per call to MXFP8 with the ``mxfp8`` codec (1x32 blocks along K, same padding and blocked layout),
then::

    F.scaled_mm(xq, w.t(), scale_a=xs, scale_recipe_a=BlockWise1x32, scale_b=ws,
                scale_recipe_b=BlockWise1x32, swizzle_a=SWIZZLE_32_4_4, swizzle_b=SWIZZLE_32_4_4,
                output_dtype=bf16/fp16/fp32)

and the padded output is cropped to ``[M_x, out_features]``. The e8m0 scales are the stored uint8 codes
viewed as ``torch.float8_e8m0fnu`` (same bits).

No Blackwell GPU is available to this project: the gating (``capabilities``), the arguments above and
the numerics are tested on CPU with the capability mocked and ``_scaled_mm`` replaced by an emulator
that decodes exactly these arguments (tests/test_ops_mx.py). On Hopper this path is never chosen
(cuBLAS raises CUBLAS_STATUS_NOT_SUPPORTED there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..converter.formats import get_codec


def _scaled_mm(*args, **kwargs):  # indirection so tests can emulate it on CPU
    return F.scaled_mm(*args, **kwargs)


def quantize_activation_mx(x2: torch.Tensor):
    """MXFP8 codes of a 2-D activation: (e4m3 [roundup(M,32), roundup(K,32)], blocked e8m0 uint8)."""
    q = get_codec("mxfp8").quantize(x2.to(torch.float32), name="activation")
    return q["weight"], q["weight_scale"]


def mx_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, shape: tuple[int, int],
              bias: torch.Tensor | None = None) -> torch.Tensor:
    n_out, k_in = shape
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in)
    xq, xs = quantize_activation_mx(x2)
    out = _scaled_mm(
        xq, w.t(),
        scale_a=xs.view(torch.float8_e8m0fnu), scale_recipe_a=F.ScalingType.BlockWise1x32,
        scale_b=w_scale.view(torch.float8_e8m0fnu), scale_recipe_b=F.ScalingType.BlockWise1x32,
        swizzle_a=F.SwizzleType.SWIZZLE_32_4_4, swizzle_b=F.SwizzleType.SWIZZLE_32_4_4,
        output_dtype=out_dtype,
    )
    out = out[: x2.shape[0], :n_out]
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*lead, n_out)
