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


def _patched_4bit(comfy, adapters):
    """Layer ``b`` (NF4, nested) patched with ``adapters`` [(adapter, strength), ...] through the
    adopted ModelPatcher: (model, patcher, float reference weights, input)."""
    import comfy.model_patcher

    import hybridquant.ops as ops

    sd, ref = H.build({"a": "float8_e4m3fn", "b": "bnb_nf4+nested", "c": "float8_e4m3fn"})
    m = H.load_ours(sd)
    cpu = torch.device("cpu")
    mp = ops.adopt_patcher(comfy.model_patcher.ModelPatcher(m, load_device=cpu, offload_device=cpu))
    patched = mp.clone()
    for adapter, strength in adapters:
        patched.add_patches({"b.weight": adapter}, strength)
    patched.load(cpu, lowvram_model_memory=0, force_patch_weights=False, full_load=True)
    return m, patched, ref, H.inputs()


def test_4bit_plain_loras_run_as_one_low_rank_branch(comfy):
    """Two plain LoRAs on a 4-bit layer: no dequantized weight, one concatenated branch whose factors
    are built once (kept while the patch list is the same); the output is W0 + both deltas."""
    from comfy.weight_adapter.lora import LoRAAdapter

    (u1, d1), (u2, d2) = _lora(40, 96, rank=4, seed=5), _lora(40, 96, rank=8, seed=6)
    m, patched, ref, x = _patched_4bit(comfy, [
        (LoRAAdapter(set(), (u1, d1, torch.tensor(2.0), None, None, None)), 0.8),
        (LoRAAdapter(set(), (u2, d2, None, None, None, None)), -0.5)])
    y = m(x)
    assert m.b.hq_last_path.endswith("+lora"), m.b.hq_last_path
    down, up = m.b.hq_lora.low_rank(x.device, x.dtype, (40, 96))
    assert down.shape == (12, 96) and up.shape == (40, 12)
    assert m.b.hq_lora.low_rank(x.device, x.dtype, (40, 96))[0] is down  # cached, not rebuilt per call
    ref2 = dict(ref)
    ref2["b.weight"] = ref["b.weight"] + (u1 @ d1) * (2.0 / 4) * 0.8 + (u2 @ d2) * -0.5
    torch.testing.assert_close(y, H.reference_model(ref2)(x), rtol=1e-5, atol=1e-6)
    patched.unpatch_model(torch.device("cpu"))
    assert m.b.hq_lora is None


def test_4bit_lora_with_other_patch_keeps_calculate_weight(comfy):
    """A patch list with anything but plain LoRA (here a DoRA scale) is applied by ComfyUI's
    calculate_weight on the dequantized weight, exactly as a merge would compute it."""
    import comfy.lora
    from comfy.weight_adapter.lora import LoRAAdapter

    up, down = _lora(40, 96)
    dora = torch.rand(40, 1) + 0.5
    adapter = LoRAAdapter(set(), (up, down, torch.tensor(4.0), None, dora, None))
    m, patched, ref, x = _patched_4bit(comfy, [(adapter, 1.0)])
    y = m(x)
    assert m.b.hq_last_path == "dequant"
    assert m.b.hq_lora.low_rank(x.device, x.dtype, (40, 96)) is None
    w = comfy.lora.calculate_weight(patched.patches["b.weight"], m.b.hq_dequantize(m.b.hq_tensors(), torch.float32),
                                    "b.weight", intermediate_dtype=torch.float32)
    ref2 = dict(ref)
    ref2["b.weight"] = w
    torch.testing.assert_close(y, H.reference_model(ref2)(x), rtol=1e-5, atol=1e-6)


def test_plain_lora_rule():
    """What counts as a plain LoRA entry: the adapter or the older ("lora", weights) tuple, whole
    weight, no function, strength_model 1, no mid / DoRA / reshape, factor shapes matching."""
    from hybridquant.ops import lora

    up, down = torch.zeros(40, 4), torch.zeros(4, 96)
    w = (up, down, torch.tensor(2.0), None, None, None)
    assert lora._plain_lora((0.5, ("lora", w), 1.0, None, None), (40, 96))[2] == 0.5 * 2.0 / 4
    assert lora._plain_lora((0.5, ("lora", w), 0.9, None, None), (40, 96)) is None
    assert lora._plain_lora((0.5, ("lora", w), 1.0, (0, 0, 20), None), (40, 96)) is None
    assert lora._plain_lora((0.5, ("lora", w), 1.0, None, lambda a: a), (40, 96)) is None
    assert lora._plain_lora((0.5, ("lora", w), 1.0, None, None), (96, 40)) is None
    assert lora._plain_lora((0.5, ("loha", w), 1.0, None, None), (40, 96)) is None
    assert lora._plain_lora((0.5, ("lora", (up, down, None, torch.zeros(1), None, None)), 1.0, None, None),
                            (40, 96)) is None
    assert lora._plain_lora((0.5, ("lora", w[:5] + ([40, 96],)), 1.0, None, None), (40, 96)) is None
