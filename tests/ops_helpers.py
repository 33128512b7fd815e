"""Helpers for the ops tests: tiny models built with our ops, state dicts written the way the
converter (codecs + ``.comfy_quant``) and bitsandbytes write them, and dequantized references.

Not a test module (no ``test_`` prefix); imported by tests/test_ops_*.py after the ``comfy`` fixture
has put ComfyUI on ``sys.path``.
"""

from __future__ import annotations

import importlib

import torch

from hybridquant.converter import metadata as qmeta
from hybridquant.converter.formats import get_codec

# (in, out, bias) of the three layers; 80 and 40 are not multiples of 32 (MXFP8 padding) and
# 40*... keeps every bitsandbytes block count non-trivial.
DIMS = (("a", 80, 96, True), ("b", 96, 40, False), ("c", 40, 48, True))
IN_FEATURES = 80

CODEC_CASES = {
    "float8_e4m3fn": {},
    "float8_e4m3fn+input_scale": {"input_scale": 0.02},
    "float8_e5m2": {},
    "float8_e4m3fn_rowwise": {},
    "float8_e4m3fn_blockwise": {"group_size": 32},
    "int8_tensorwise": {},
    "int8_tensorwise+per_row": {"per_row": True},
    "int8_blockwise": {"group_size": 32},
    "mxfp8": {},
    "hybrid_mxfp8": {},
    "nvfp4": {},
    "int5_groupwise": {"group_size": 32},
    "int6_groupwise": {"group_size": 32},
}
BNB_CASES = {"bnb_nf4": ("nf4", False), "bnb_nf4+nested": ("nf4", True), "bnb_fp4": ("fp4", False),
             "bnb_fp4+nested": ("fp4", True)}


def codec_available(name: str) -> bool:
    try:
        get_codec(name)
        return True
    except Exception:
        return False


class Tiny(torch.nn.Module):
    def __init__(self, ops, dtype=torch.float32):
        super().__init__()
        for name, i, o, bias in DIMS:
            setattr(self, name, ops.Linear(i, o, bias=bias, dtype=dtype))

    def forward(self, x):
        x = torch.nn.functional.gelu(self.a(x))
        x = torch.nn.functional.gelu(self.b(x))
        return self.c(x)


def float_weights(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, i, o, bias in DIMS:
        sd[f"{name}.weight"] = torch.randn(o, i, generator=g) * 0.05
        if bias:
            sd[f"{name}.bias"] = torch.randn(o, generator=g) * 0.1
    return sd


def quantize_comfy(layer: str, w: torch.Tensor, case: str) -> tuple[dict, torch.Tensor]:
    """Tensors the converter writes for ``layer`` (codec output + ``.comfy_quant``) and the float
    weight a reader must compute with (the codec's dequantization)."""
    fmt = case.split("+")[0]
    opts = dict(CODEC_CASES[case])
    codec = get_codec(fmt)
    q = codec.quantize(w, **opts)
    meta = codec.metadata(**opts)
    meta["orig_shape"] = list(w.shape)
    meta["orig_dtype"] = "float32"
    out = {f"{layer}.{s}": t for s, t in q.items()}
    out[f"{layer}.comfy_quant"] = qmeta.encode_comfy_quant(meta)
    ref = codec.dequantize(q, tuple(w.shape), torch.float32, **{k: v for k, v in opts.items() if k != "input_scale"})
    return out, ref


def quantize_bnb(layer: str, w: torch.Tensor, case: str) -> tuple[dict, torch.Tensor]:
    """What bitsandbytes itself writes (``Params4bit`` state dict) and ITS dequantization (oracle)."""
    import bitsandbytes.functional as bf

    qt, nested = BNB_CASES[case]
    packed, qs = bf.quantize_4bit(w.contiguous(), blocksize=64, quant_type=qt, compress_statistics=nested)
    out = {f"{layer}.weight": packed}
    for k, v in qs.as_dict(packed=True).items():
        out[f"{layer}.weight.{k}"] = v
    return out, bnb_reference_dequant(packed, qs)


def bnb_reference_dequant(packed, qs) -> torch.Tensor:
    """bitsandbytes' own pure-torch dequantization (its reference backend). Not ``dequantize_4bit`` on
    CPU: bitsandbytes 0.50.2's AVX-512 kernel indexes absmax per row, wrong when a row is not a whole
    number of blocks (our 80-wide layers); the reference and CUDA index the flat tensor, as the format
    defines (see tests/test_formats_bnb4bit.py)."""
    import bitsandbytes.functional as bf
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = qs.absmax
    if qs.nested:
        absmax = bf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    code = _get_4bit_code(qs.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), code, qs.blocksize, qs.shape,
                                    torch.float32).to(torch.float32)


def quantize_layer(layer, w, case):
    return quantize_bnb(layer, w, case) if case in BNB_CASES else quantize_comfy(layer, w, case)


def build(cases: dict, seed=0):
    """(file state dict, float reference state dict) for a Tiny with ``cases[layer]`` per layer
    (``None`` = plain layer)."""
    fw = float_weights(seed)
    sd, ref = {}, {}
    for name, _i, _o, bias in DIMS:
        case = cases.get(name)
        if case is None:
            sd[f"{name}.weight"] = fw[f"{name}.weight"]
            ref[f"{name}.weight"] = fw[f"{name}.weight"]
        else:
            t, r = quantize_layer(name, fw[f"{name}.weight"], case)
            sd.update(t)
            ref[f"{name}.weight"] = r
        if bias:
            sd[f"{name}.bias"] = fw[f"{name}.bias"]
            ref[f"{name}.bias"] = fw[f"{name}.bias"]
    return sd, ref


def reference_model(ref_sd: dict) -> torch.nn.Module:
    import comfy.ops

    m = Tiny(comfy.ops.manual_cast)
    m.load_state_dict(ref_sd)
    return m


def load_ours(sd: dict, header=None, ops_name=None, prepare=True):
    ops = importlib.import_module("hybridquant.ops")
    cls = ops.choose_ops(sd.keys(), header, override=ops_name)
    m = Tiny(cls)
    m.load_state_dict(ops.prepare_state_dict(sd, header) if prepare else sd, strict=True)
    return m


def stored_bytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def inputs(seed=1, n=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN_FEATURES, generator=g).to(dtype)
