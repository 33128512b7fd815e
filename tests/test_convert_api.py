"""The library API the ComfyUI node uses: ``quantize_state_dict`` and ``convert_file`` agree; progress and
cancel callbacks; the planner's rules."""

from __future__ import annotations

import os

import pytest
import torch
from convert_helpers import load_all, make_weights, write_checkpoint

from hybridquant.converter.convert import convert_file, quantize_state_dict
from hybridquant.converter.errors import Cancelled, OptionError
from hybridquant.converter.plan import Planner, PlanOptions


def test_state_dict_and_file_agree(tmp_path):
    src = tmp_path / "in.safetensors"
    w = write_checkpoint(src)
    opts = PlanOptions(mode="bnb4bit", custom_layers="img_mlp", custom_type="int8", custom_scaling_mode="row",
                       presets=("flux1",), method="rtn")
    calls = []
    rep = convert_file(src, tmp_path / "out.safetensors", opts, progress=lambda d, t, n: calls.append((d, t, n)))
    from convert_helpers import METADATA

    sd, md, rep2 = quantize_state_dict(w, opts, input_metadata=METADATA)
    on_disk, md_disk = load_all(tmp_path / "out.safetensors")
    assert set(sd) == set(on_disk)
    for k in sd:
        a, b = sd[k], on_disk[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                           b.view(torch.uint8) if b.element_size() == 1 else b), k
    assert md == md_disk
    assert rep.formats() == rep2.formats() == {"bnb_nf4": 5, "int8_tensorwise": 2}
    assert calls[-1][0] == calls[-1][1] and len(calls) == len(w)
    assert {r.name: r.rel_error for r in rep.layers} == {r.name: r.rel_error for r in rep2.layers}
    assert sd["img_in.weight"] is w["img_in.weight"]  # kept layers are passed through, not copied


def test_cancel_removes_output(tmp_path):
    src = tmp_path / "in.safetensors"
    write_checkpoint(src)
    n = {"calls": 0}

    def cancel():
        n["calls"] += 1
        return n["calls"] > 3

    out = tmp_path / "out.safetensors"
    with pytest.raises(Cancelled):
        convert_file(src, out, PlanOptions(method="rtn"), cancel=cancel)
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]
    with pytest.raises(Cancelled):
        quantize_state_dict(make_weights(), PlanOptions(method="rtn"), cancel=cancel)


def test_planner_rules():
    p = Planner(PlanOptions(custom_layers="attn", custom_type="nvfp4", exclude_layers="attn|mlp", presets=("t5xxl",)))
    assert p.plan("blocks.0.attn.weight", (64, 64), "bfloat16").format == "nvfp4"  # custom beats exclusion
    assert p.plan("blocks.0.mlp.weight", (64, 64), "bfloat16").reason == "--exclude-layers"
    assert p.plan("shared.weight", (64, 64), "bfloat16").format is None  # embedding table
    assert p.plan("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 64), "float32").format is None
    assert p.plan("blocks.0.x.weight", (64, 64), "float8_e4m3fn").format is None  # already quantized
    assert p.plan("blocks.0.x.weight", (64, 64, 3), "float32").format is None
    assert p.plan("blocks.0.x.bias", (64, 64), "float32").format is None
    assert p.plan("model.diffusion_model.blocks.0.x.weight", (64, 64), "float16").format == "float8_e4m3fn"
    with pytest.raises(OptionError, match="unknown preset"):
        Planner(PlanOptions(presets=("sd15",)))
    with pytest.raises(OptionError, match="unknown rounding method"):
        Planner(PlanOptions(method="magic"))


@pytest.mark.parametrize("flag,name", [("flux1", "model.diffusion_model.img_in"), ("flux2", "double_stream_modulation_img.lin"),
                                       ("chroma", "distilled_guidance_layer.layers.0.in_layer"), ("qwen", "time_text_embed.timestep_embedder.linear_1"),
                                       ("wan", "time_projection.1"), ("hunyuan", "txt_in.individual_token_refiner.blocks.0.mlp.fc1"),
                                       ("zimage", "cap_embedder.1"), ("ltxv", "adaln_single.linear"), ("t5xxl", "shared")])
def test_presets_keep_their_layers(flag, name):
    p = Planner(PlanOptions(presets=(flag,)))
    assert p.plan(f"{name}.weight", (64, 64), "bfloat16").format is None
    assert p.plan("blocks.0.attn.qkv.weight", (64, 64), "bfloat16").format == "float8_e4m3fn"


def test_error_sampling_estimates_the_exact_error(monkeypatch):
    from hybridquant.converter import error_stats as convert
    from hybridquant.converter.formats import get_codec

    w = (torch.randn(2048, 256, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    monkeypatch.setattr(convert, "ERROR_SAMPLE_MIN_ELEMS", 1000)
    for fmt, opts in (("float8_e4m3fn", {}), ("int8_tensorwise", {"per_row": True}), ("mxfp8", {})):
        c = get_codec(fmt)
        out = c.quantize(w, **opts)
        exact, f1 = convert.relative_error(c, out, w, w.shape, opts, chunk_elems=64 * 256)
        est, f = convert.relative_error(c, out, w, w.shape, opts, chunk_elems=64 * 256, sample=0.125)
        ref = float((c.dequantize(out, w.shape, torch.float32, **opts) - w.float()).norm() / w.float().norm())
        assert f1 == 1.0 and exact == pytest.approx(ref, rel=1e-4)
        if fmt == "mxfp8":  # padded/swizzled layout: never sampled
            assert f == 1.0 and est == exact
        else:
            assert f == pytest.approx(0.125) and est == pytest.approx(exact, rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
@pytest.mark.parametrize("flags", [{}, {"mode": "int8", "scaling_mode": "row"}, {"mode": "mxfp8"}, {"mode": "nvfp4"},
                                   {"mode": "bnb4bit"}])
def test_device_cuda_matches_cpu(tmp_path, flags):
    """--device cuda streams through the GPU and writes the same file as the CPU (RTN)."""
    src = tmp_path / "in.safetensors"
    write_checkpoint(src)
    opts = PlanOptions(method="rtn", **flags)
    a = convert_file(src, tmp_path / "cpu.safetensors", opts, device="cpu")
    b = convert_file(src, tmp_path / "gpu.safetensors", opts, device="cuda")
    assert b.device.startswith("cuda")
    ta, _ = load_all(tmp_path / "cpu.safetensors")
    tb, _ = load_all(tmp_path / "gpu.safetensors")
    assert set(ta) == set(tb)
    for k in ta:
        x, y = ta[k], tb[k]
        assert torch.equal(x.view(torch.uint8) if x.element_size() == 1 else x,
                           y.view(torch.uint8) if y.element_size() == 1 else y), k
    for ra, rb in zip(a.layers, b.layers):
        assert (ra.rel_error is None) == (rb.rel_error is None)
        if ra.rel_error is not None:
            assert rb.rel_error == pytest.approx(ra.rel_error, rel=1e-3)
