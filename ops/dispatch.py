"""Which kernel runs a format on a device: the format's ``spec.kernels`` against the device's
``capabilities.features``. ComfyUI-free (the nodes' panel asks the same question as the layers).

Kernel ids are the ops' own; a format names them in its spec (``converter/formats/spec.py``). An id
listed by a format but not implemented here counts as "dequantize per call", so a format can declare a
kernel before the ops have it.
"""

from __future__ import annotations

from ..converter.formats import find_spec
from . import capabilities as caps

KERNEL_FP8 = "fp8"  # tensorwise FP8 torch._scaled_mm with a fused activation scale (matmul_fp8)
KERNEL_FP8_AT_LOAD = "fp8@load"  # MX weights re-expressed once as tensorwise FP8, then KERNEL_FP8
KERNEL_MX = "mx"  # block-scaled MXFP8 scaled_mm (matmul_mx)
KERNEL_BNB = "bnb"  # bitsandbytes matmul_4bit
KERNEL_INT8 = "int8"  # W8A8 per-token int8 x int8 torch._int_mm + fused dequant epilogue (matmul_int8)
KERNEL_FP8_ROWWISE = "fp8_rowwise"  # row-wise FP8 _scaled_mm, per-token activations (matmul_fp8)
KERNEL_DQ4 = "dq4"  # our Triton 4-bit kernels: fused GEMV (few rows) / one-launch dequantize + GEMM (dequant4)
KERNEL_DQ_INT = "dq_int"  # our Triton 5/6-bit kernel: one-launch dequantize + GEMM (dequant_int)
DEQUANT = "dequant"

LABELS = {
    KERNEL_FP8: "FP8 tensor-core matmul",
    KERNEL_FP8_AT_LOAD: "FP8 tensor-core matmul (re-expressed at load)",
    KERNEL_MX: "MXFP8 block-scaled matmul",
    KERNEL_BNB: "bitsandbytes CUDA kernels",
    KERNEL_INT8: "INT8 tensor-core matmul (per-token activations)",
    KERNEL_FP8_ROWWISE: "FP8 row-wise tensor-core matmul (per-token activations)",
    KERNEL_DQ4: "4-bit Triton GEMV / one-pass dequantize + bf16 matmul",
    KERNEL_DQ_INT: "5/6-bit Triton one-pass dequantize + bf16 matmul",
    DEQUANT: "dequantize per layer, then bf16 matmul",
}
IMPLEMENTED = frozenset(LABELS) - {DEQUANT}


def kernel_for(fmt: str, device) -> str:
    """The kernel id of format ``fmt`` on ``device`` (``DEQUANT`` when none applies)."""
    spec = find_spec(fmt)
    if spec is None:
        return DEQUANT
    for feature in caps.features(device):
        kernel = spec.kernels.get(feature)
        if kernel in IMPLEMENTED:
            if kernel == KERNEL_BNB and not caps.bnb_cuda_available(device):
                continue
            return kernel
    return DEQUANT


def reexpressible(fmt: str | None) -> bool:
    """Whether some device runs ``fmt`` re-expressed as tensorwise FP8 (MXFP8 / Hybrid MXFP8 on Ada/Hopper)."""
    spec = find_spec(fmt)
    return bool(spec is not None and KERNEL_FP8_AT_LOAD in spec.kernels.values())


def is_four_bit(fmt: str | None) -> bool:
    spec = find_spec(fmt)
    return bool(spec is not None and spec.four_bit)


def scale_factors_out(fmt: str | None) -> bool:
    """dequant(w) = codes * (scalar or per-row scale): small-M paths apply the scale to the output."""
    spec = find_spec(fmt)
    return bool(spec is not None and spec.scale_out)
