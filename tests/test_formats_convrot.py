"""convrot_w4a4 / asym_w4a8_int8: bit-exact against comfy-kitchen's own quantizers (the layouts current
ComfyUI loads natively), round trips, errors, and loading through the pack's ops (any ComfyUI)."""

import pytest
import torch

from hybridquant.converter.formats import FormatError, get_codec

SHAPES = [(8, 256), (5, 512), (33, 768)]


def _w(shape, dtype=torch.float32, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if heavy:  # sparse AFTER rotation (H is its own inverse): drives the codebook fit, not the fixed table
        from hybridquant.converter.formats import _convrot

        w = _convrot.rotate(w * (torch.rand(shape, generator=g) < 0.05), 256)
    return w.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convrot_w4a4_matches_kitchen(shape, dtype):
    ck = pytest.importorskip("comfy_kitchen.tensor.convrot_w4a4")
    w = _w(shape, dtype)
    ours = get_codec("convrot_w4a4").quantize(w)
    q, s = ck.quantize_convrot_w4a4_weight(w, 256, 64)
    assert torch.equal(ours["weight"], q) and ours["weight"].dtype == torch.int8
    assert torch.equal(ours["weight_scale"], s) and ours["weight_scale"].dtype == torch.float32
    deq = get_codec("convrot_w4a4").dequantize(ours, shape)
    ref = ck.dequantize_convrot_w4a4_weight(q, s, 256, 64, torch.float32)
    torch.testing.assert_close(deq, ref, rtol=1e-6, atol=1e-6)
    rel = (deq - w.float()).norm() / w.float().norm()
    assert rel < 0.2  # 4-bit, 15 levels per row after rotation


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("codebook,heavy", [(True, False), (True, True), (False, False)])
def test_w4a8_matches_kitchen(shape, codebook, heavy):
    ck = pytest.importorskip("comfy_kitchen.tensor.w4a8_int8")
    w = _w(shape, heavy=heavy)
    ours = get_codec("asym_w4a8_int8").quantize(w, codebook=codebook)
    q, s_rel, s_ch, corr, cb = ck.quantize_w4a8_int8_weight(w, group_size=16, convrot_groupsize=256, codebook=codebook)
    assert corr is None
    assert torch.equal(ours["weight"], q)
    assert torch.equal(ours["weight_s_rel"].view(torch.uint8), s_rel.view(torch.uint8))
    assert torch.equal(ours["weight_s_channel"], s_ch)
    if codebook:
        assert torch.equal(ours["weight_codebook"], cb)
    else:
        assert cb is None and "weight_codebook" not in ours
    deq = get_codec("asym_w4a8_int8").dequantize(ours, shape)
    ref = ck.dequantize_w4a8_int8_weight(q, s_rel, s_ch, codebook=cb, group_size=16, convrot_groupsize=256,
                                         output_dtype=torch.float32)
    torch.testing.assert_close(deq, ref, rtol=1e-6, atol=1e-6)
    assert (deq - w).norm() / w.norm() < 0.2


def test_heavy_tail_takes_the_fit():
    """The heavy-tailed weight really exercises the k-means branch (else the test above proves less)."""
    from hybridquant.converter.formats import asym_w4a8_int8 as m

    cb = get_codec("asym_w4a8_int8").quantize(_w((33, 768), heavy=True))["weight_codebook"]
    assert not torch.equal(cb, torch.tensor(m.LLOYD_MAX_16))


@pytest.mark.parametrize("fmt", ["convrot_w4a4", "asym_w4a8_int8"])
def test_output_specs_and_errors(fmt):
    c = get_codec(fmt)
    t = c.quantize(_w((8, 256)))
    specs = c.output_specs((8, 256))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {k: (s.dtype, s.shape) for k, s in specs.items()}
    with pytest.raises(FormatError, match="multiple"):
        c.quantize(_w((8, 200)))
    with pytest.raises(FormatError, match="power of 4"):
        c.output_specs((8, 256), convrot_groupsize=128)
    with pytest.raises(FormatError, match="layer: missing"):
        c.validate("layer", {"weight": t["weight"]}, (8, 256))
    bad = dict(t, weight=t["weight"][:, :-1])
    with pytest.raises(FormatError, match="expected shape"):
        c.dequantize(bad, (8, 256))


def test_metadata_is_what_comfyui_reads():
    assert get_codec("convrot_w4a4").metadata() == {"format": "convrot_w4a4", "convrot_groupsize": 256}
    assert get_codec("asym_w4a8_int8").metadata(codebook=False) == {
        "format": "asym_w4a8_int8", "group_size": 16, "convrot_groupsize": 256}
