"""Decode a saved quantized file with independent oracles, not with our codecs or ops.

bitsandbytes' own ``QuantState.from_dict`` + ``dequantize_4bit`` for the NF4 layers, and
``q.float() * weight_scale`` (ARCHITECTURE.md, "On-disk conventions") for tensorwise FP8 layers. Non-quantized tensors must be
bit-identical to the original.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def decode_with_oracles(path, original: dict) -> tuple[dict, dict]:
    """Decode every layer of the saved file independently of our code; returns (weights, rel errors)."""
    import bitsandbytes.functional as bnbf

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        t = {k: f.get_tensor(k) for k in keys}
        meta = f.metadata() or {}
    header_layers = json.loads(meta["_quantization_metadata"])["layers"]
    out, errs = {}, {}
    bnb_layers = [k[: -len(".weight.quant_state.bitsandbytes__nf4")] for k in keys
                  if k.endswith(".weight.quant_state.bitsandbytes__nf4")]
    for layer in bnb_layers:
        pre = layer + ".weight."
        qs = bnbf.QuantState.from_dict({k[len(pre):]: v for k, v in t.items() if k.startswith(pre)}, device="cpu")
        w = bnbf.dequantize_4bit(t[layer + ".weight"], qs).float()
        out[layer + ".weight"] = w
    for layer, d in header_layers.items():
        assert d["format"] == "float8_e4m3fn", d
        cq = json.loads(bytes(t[layer + ".comfy_quant"].tolist()))
        assert cq["format"] == "float8_e4m3fn"
        out[layer + ".weight"] = t[layer + ".weight"].float() * t[layer + ".weight_scale"].float()
    for k, v in original.items():
        if k in out:
            assert out[k].shape == v.shape, k
            errs[k] = rel(out[k], v.float())
        else:
            assert k in t, f"{k} missing from the saved file"
            assert torch.equal(t[k], v), f"{k}: a non-quantized tensor changed"
            out[k] = v
    return out, errs
