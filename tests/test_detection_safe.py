"""Detection-safe files (issue 15 item 3): the layers ComfyUI's model detection reads by shape keep
their true shape in every format, so ComfyUI detects the same model from a converted file as from
the bf16 one.

Per architecture a state dict holds the keys that select its branch of ComfyUI's own detection
(``comfy.model_detection.detect_unet_config``, ``comfy.sd.detect_te_model``) and the weights whose
shapes that branch reads, at widths small enough for CPU (detection reads ratios of shapes, not
absolute sizes). Each is converted with every format family of the registry (formats added later
join automatically) and the raw tensors of the written file -- what a stock loader hands to
detection -- are detected again. Without ``converter/detection.py`` NVFP4, int5/int6 and
bitsandbytes 4-bit halve or flatten ``img_in``/``y_embedder``/... and the detected config differs.
"""

from __future__ import annotations

import pytest
import torch

from hybridquant.converter import detection
from hybridquant.converter.convert import quantize_state_dict
from hybridquant.converter.formats import FormatError, registry
from hybridquant.converter.plan import Planner, PlanOptions


def _families():
    return registry.families()


def _w(*shape):
    g = torch.Generator().manual_seed(sum(shape))
    return (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)


def _n(dim):
    return torch.ones(dim, dtype=torch.bfloat16)


# architecture -> (detector, state dict). Keys as real checkpoints name them after the prefix.
def _arch_dicts():
    h = 128
    return {
        "sd3": ("unet", {"joint_blocks.0.context_block.attn.qkv.weight": _w(3 * h, h),
                         "x_embedder.proj.weight": _w(h, 16, 2, 2), "final_layer.linear.weight": _w(64, h),
                         "y_embedder.mlp.0.weight": _w(h, 2048), "context_embedder.weight": _w(h, 256),
                         "pos_embed": _w(1, 64, h)}),
        "flux": ("unet", {"double_blocks.0.img_attn.norm.key_norm.scale": _n(h),
                          "img_in.weight": _w(h, 64), "txt_in.weight": _w(h, 256),
                          "vector_in.in_layer.weight": _w(h, 768), "double_blocks.0.img_mlp.0.weight": _w(4 * h, h)}),
        "flux2": ("unet", {"double_blocks.0.img_attn.norm.key_norm.scale": _n(h),
                           "double_stream_modulation_img.lin.weight": _w(6 * h, h),
                           "img_in.weight": _w(h, 128), "txt_in.weight": _w(h, 256)}),
        "chroma": ("unet", {"double_blocks.0.img_attn.norm.key_norm.scale": _n(h),
                            "distilled_guidance_layer.norms.0.scale": _n(h),
                            "img_in.weight": _w(h, 64), "txt_in.weight": _w(h, 256)}),
        "hunyuan_video": ("unet", {"txt_in.individual_token_refiner.blocks.0.norm1.weight": _n(h),
                                   "img_in.proj.weight": _w(h, 16, 1, 2, 2), "final_layer.linear.weight": _w(64, h),
                                   "txt_in.input_embedder.weight": _w(h, 256)}),
        "ltxv": ("unet", {"adaln_single.emb.timestep_embedder.linear_1.bias": _n(h),
                          "transformer_blocks.0.attn2.to_k.weight": _w(1024, 256)}),
        "lumina2": ("unet", {"cap_embedder.1.weight": _w(256, 128), "noise_refiner.0.attention.k_norm.weight": _n(64),
                             "layers.0.attention.qkv.weight": _w(768, 256)}),
        "wan": ("unet", {"head.modulation": _w(1, 2, 256), "head.head.weight": _w(64, 256),
                         "blocks.0.ffn.0.weight": _w(1024, 256), "blocks.1.ffn.0.weight": _w(1024, 256),
                         "patch_embedding.weight": _w(256, 16, 1, 2, 2)}),
        "qwen_image": ("unet", {"txt_norm.weight": _n(3584), "img_in.weight": _w(256, 64), "proj_out.weight": _w(64, 256),
                                "transformer_blocks.0.img_mlp.net.0.proj.weight": _w(1024, 256)}),
        # real width: 0.3.75 tells T5-XXL by in_features (4096; packed NVFP4 would read 2048 = T5-XL),
        # 0.33 by out_features (10240)
        "t5": ("te", {"encoder.block.23.layer.1.DenseReluDense.wi_1.weight": _w(10240, 4096),
                      "encoder.final_layer_norm.weight": _n(64)}),
    }


def _detect(comfy_mod, kind, sd, prefix=""):
    if kind == "unet":
        import comfy.model_detection as md

        return md.detect_unet_config(sd, prefix)
    import comfy.sd

    return comfy.sd.detect_te_model(sd)


def test_every_detection_read_keeps_its_shape_in_every_family():
    """ComfyUI-free: no plan writes a detection-read layer in a shape-changing format."""
    for fam in _families():
        planner = Planner(PlanOptions(mode=fam))
        for reads in detection.DETECTION_READS.values():
            for r in reads:
                for prefix in ("", "model.diffusion_model."):
                    shape = (256, 512)
                    p = planner.plan(f"{prefix}{r.layer}.weight", shape, "bfloat16")
                    if p.quantized:
                        assert detection.stored_weight_shape(p.format, shape, p.opts) == shape, (fam, r.layer)
                    else:
                        assert p.reason.startswith(detection.DETECTION_SAFE), (fam, r.layer, p.reason)
                        assert detection.detection_read(r.layer)[1].source in p.reason


def test_other_layers_are_untouched_and_warning_names_layers(caplog):
    sd = {"img_in.weight": _w(128, 64), "double_blocks.0.img_mlp.0.weight": _w(512, 128)}
    with caplog.at_level("WARNING", logger="hybridquant"):
        out, _, report = quantize_state_dict(sd, PlanOptions(mode="nvfp4"), error_stats=False)
    formats = {r.name: r.format for r in report.layers}
    assert formats == {"img_in.weight": None, "double_blocks.0.img_mlp.0.weight": "nvfp4"}
    assert torch.equal(out["img_in.weight"], sd["img_in.weight"])
    assert "img_in.weight" in caplog.text and "model detection" in caplog.text


@pytest.mark.comfyui
@pytest.mark.parametrize("arch", list(_arch_dicts()))
def test_stock_detection_same_config_for_every_format(comfy, arch):
    kind, sd = _arch_dicts()[arch]
    want = _detect(comfy, kind, sd)
    assert want not in (None, {}), f"{arch}: the synthetic dict does not select ComfyUI's branch"
    if kind == "unet" and arch != "sd3":
        assert want.get("image_model", "").replace(".1", "").startswith(arch.split("_")[0]) or arch == "lumina2"
    prefixes = ("", "model.diffusion_model.") if kind == "unet" else ("",)
    for fam in _families():
        for prefix in prefixes:  # bare diffusion-model files and full checkpoints' prefix
            try:
                out, _, _ = quantize_state_dict({prefix + k: v for k, v in sd.items()}, PlanOptions(mode=fam),
                                                error_stats=False)
            except FormatError as e:
                # ConvRot formats need in_features a multiple of their group (256): these synthetic
                # widths (64/128) are below it, so the family cannot write this dict at all.
                assert "convrot_groupsize" in str(e), e
                continue
            got = _detect(comfy, kind, out, prefix)
            assert got == want, f"{arch} as {fam} (prefix {prefix!r}): ComfyUI detects {got} instead of {want}"
