"""LoRA through ComfyUI's own ModelPatcher (``add_patches`` with a ``LoRAAdapter``, as ComfyUI's
LoRA loader represents it in 0.3.75 and 0.29): merged for 8-bit layers (fixed-scale requantization),
on the fly for 4-bit layers; unpatching restores the outputs exactly; low-VRAM agrees with merged.

Reference: FP8/INT8 -> ``dequant(quantize(W0 + dW, stored scales))`` by the codec (what merging must
give); 4-bit -> ``W0 + dW`` (nothing is requantized). dW = up @ down * alpha / rank. Tolerance 1e-5
relative: float32 GEMM/addition order differences only.
"""

from __future__ import annotations

import ops_helpers as H
import pytest
import torch

pytestmark = pytest.mark.comfyui


def _lora(o, i, rank=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(o, rank, generator=g) * 0.05, torch.randn(rank, i, generator=g) * 0.05


@pytest.mark.parametrize("case", ["float8_e4m3fn", "int8_blockwise", "bnb_nf4+nested", "mxfp8"])
@pytest.mark.parametrize("lowvram", [False, True])
def test_lora_patch_and_unpatch(comfy, case, lowvram):
    import comfy.model_patcher
    from comfy.weight_adapter.lora import LoRAAdapter

    import hybridquant.ops as ops
    from hybridquant.converter.formats import get_codec

    sd, ref = H.build({"a": "bnb_nf4", "b": case, "c": "float8_e4m3fn"})
    m = H.load_ours(sd)
    cpu = torch.device("cpu")
    mp = ops.adopt_patcher(comfy.model_patcher.ModelPatcher(m, load_device=cpu, offload_device=cpu))
    x = H.inputs()
    y0 = m(x)
    up, down = _lora(40, 96)
    alpha = 2.0
    patched = mp.clone()
    assert type(patched) is type(mp)
    patched.add_patches({"b.weight": LoRAAdapter(set(), (up, down, torch.tensor(alpha), None, None, None))}, 0.8)
    patched.load(cpu, lowvram_model_memory=1 if lowvram else 0, force_patch_weights=False, full_load=not lowvram)
    y1 = m(x)

    delta = (up @ down) * (alpha / 4) * 0.8
    fmt = case.split("+")[0]
    w_lora = ref["b.weight"] + delta
    if fmt.startswith("bnb"):
        wb = w_lora
    else:
        codec = get_codec(fmt)
        stored = {k[2:]: v for k, v in sd.items() if k.startswith("b.") and k != "b.comfy_quant"}
        params = codec.stored_scale_params(stored, (40, 96), "b") if hasattr(codec, "stored_scale_params") \
            else {"weight_scale": stored["weight_scale"]}
        opts = {"group_size": 32} if fmt == "int8_blockwise" else {}
        wb = codec.dequantize({**stored, "weight": codec.quantize(w_lora, params=params, **opts)["weight"]},
                              (40, 96), **opts)
    ref2 = dict(ref)
    ref2["b.weight"] = wb
    torch.testing.assert_close(y1, H.reference_model(ref2)(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y1, y0)
    if fmt.startswith("bnb"):
        assert torch.equal(m.b.weight, sd["b.weight"])  # packed codes never rewritten
    patched.unpatch_model(cpu)
    assert torch.equal(m(x), y0)
