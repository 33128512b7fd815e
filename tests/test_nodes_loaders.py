"""Our loader nodes on mixed BNB-NF4 + FP8 files, in-process against the real ComfyUI (CPU).

A tiny SD3 checkpoint (2-block MMDiT + a full-size CLIP-L, built from ComfyUI's own classes) is
quantized by the converter (NF4 everywhere, FP8 on the attention q/qkv layers of both the diffusion
model and the text encoder). Oracle: ComfyUI's STOCK loaders on a file whose weights were decoded
independently (bitsandbytes' dequantize_4bit, q * scale) must give the same text conditioning and the
same diffusion-model output as our loaders + ops on the quantized file.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

CUSTOM = r"attn\.qkv|self_attn\.q_proj"
TE_PREFIX = "text_encoders.clip_l.transformer."


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    from e2e.oracle import decode_with_oracles
    from e2e.synthetic import clip_l_state_dict, sd3_mmdit_state_dict

    from hybridquant.converter.convert import convert_file
    from hybridquant.converter.plan import PlanOptions

    d = tmp_path_factory.mktemp("loaders")
    (d / "checkpoints").mkdir()
    (d / "text_encoders").mkdir()
    ck = {"model.diffusion_model." + k: v for k, v in sd3_mmdit_state_dict(2, seed=7).items()}
    ck.update({TE_PREFIX + k: v for k, v in clip_l_state_dict(seed=8).items()})
    save_file(ck, str(d / "plain.safetensors"))
    opts = PlanOptions(mode="bnb4bit", custom_layers=CUSTOM, custom_type="fp8")
    convert_file(d / "plain.safetensors", d / "checkpoints" / "mixed.safetensors", opts)
    decoded, errs = decode_with_oracles(d / "checkpoints" / "mixed.safetensors", ck)
    save_file({k: v.contiguous() for k, v in decoded.items()}, str(d / "decoded.safetensors"))
    # The text encoder alone as a models/text_encoders file: the quantized checkpoint's CLIP-L
    # tensors and header entries with the checkpoint prefix removed (one conversion is enough).
    with safe_open(str(d / "checkpoints" / "mixed.safetensors"), "pt") as f:
        q = {k[len(TE_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(TE_PREFIX)}
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {
        k[len(TE_PREFIX):]: v for k, v in layers.items() if k.startswith(TE_PREFIX)}})}
    save_file(q, str(d / "text_encoders" / "clip_l_mixed.safetensors"), metadata=meta)
    te_dec = {k[len(TE_PREFIX):]: v for k, v in decoded.items() if k.startswith(TE_PREFIX)}
    save_file({k: v.contiguous() for k, v in te_dec.items()}, str(d / "te_decoded.safetensors"))
    return d, errs


@pytest.fixture
def folders(files, monkeypatch):
    import folder_paths

    d, _ = files
    table = dict(folder_paths.folder_names_and_paths)
    table["checkpoints"] = ([str(d / "checkpoints")], table["checkpoints"][1])
    table["text_encoders"] = ([str(d / "text_encoders")], table["text_encoders"][1])
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    return d


def _result(out):
    return out.result if hasattr(out, "result") else out.args


def _cond(clip, text="a red cube on a wooden table"):
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return cond[0][0].float(), cond[0][1]["pooled_output"].float()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_load_checkpoint_matches_stock_loader_on_decoded_weights(folders, comfy):
    import comfy.sd

    from hybridquant.nodes.loaders import LoadCheckpointHQ
    from hybridquant.ops import HybridBNB4bitOps

    model, clip, vae = _result(LoadCheckpointHQ.execute("mixed.safetensors"))
    # "auto" picked the BNB ops for both the diffusion model and the text encoder
    assert type(model.model.diffusion_model.joint_blocks[0].x_block.attn.qkv) is HybridBNB4bitOps.Linear
    assert type(clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1) is HybridBNB4bitOps.Linear
    ref_sd = comfy.utils.load_torch_file(str(folders / "decoded.safetensors"))
    ref_model, ref_clip = comfy.sd.load_state_dict_guess_config(ref_sd, output_vae=False)[:2]

    c, pooled = _cond(clip)
    rc, rpooled = _cond(ref_clip)
    assert torch.isfinite(c).all()
    assert _rel(c, rc) < 1e-3 and _rel(pooled, rpooled) < 1e-3, (_rel(c, rc), _rel(pooled, rpooled))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, 16, generator=g)
    outs = []
    for m in (model, ref_model):
        comfy.model_management.load_models_gpu([m])
        with torch.no_grad():
            outs.append(m.model.apply_model(x, torch.tensor([0.7]), c_crossattn=rc, y=rpooled).float())
    assert _rel(outs[0], outs[1]) < 1e-4, _rel(outs[0], outs[1])


def test_load_clip_on_a_quantized_text_encoder(folders, comfy):
    import comfy.sd

    from hybridquant.nodes.loaders import LoadCLIPHQ

    (clip,) = _result(LoadCLIPHQ.execute("clip_l_mixed.safetensors", "sd3"))
    ref = comfy.sd.load_text_encoder_state_dicts(
        [comfy.utils.load_torch_file(str(folders / "te_decoded.safetensors"))], clip_type=comfy.sd.CLIPType.SD3)
    c, pooled = _cond(clip)
    rc, rpooled = _cond(ref)
    assert _rel(c, rc) < 1e-3 and _rel(pooled, rpooled) < 1e-3, (_rel(c, rc), _rel(pooled, rpooled))


def test_info_node_table_and_symlinked_file(folders, comfy, tmp_path):
    """The Info node lists every layer with its format label, shape and size (so users can write a
    regex), says whether THIS core's stock loaders read the file, and the loaders (like ComfyUI's own)
    load a file reached through a symlink placed in the model folder."""
    from hybridquant.nodes.loaders import LoadCLIPHQ, QuantizationInfo
    from hybridquant.ops import HybridQuantOps

    other_disk = tmp_path / "other_disk"
    other_disk.mkdir()
    real = other_disk / "clip_l_mixed.safetensors"
    real.write_bytes((folders / "text_encoders" / "clip_l_mixed.safetensors").read_bytes())
    link = folders / "text_encoders" / "linked_clip.safetensors"
    if not link.exists():
        os.symlink(real, link)
    (clip,) = _result(LoadCLIPHQ.execute("linked_clip.safetensors", "sd3"))
    layer = clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1
    assert type(layer) is HybridQuantOps.Linear
    out = QuantizationInfo.execute("text_encoders/clip_l_mixed.safetensors")
    text = _result(out)[0]
    assert out.ui["text"] == [text]
    info = out.ui["hybridquant_info"][0]
    assert info["formats"]["bnb_nf4"] > 0 and info["formats"]["float8_e4m3fn"] > 0
    row = next(d for d in info["layers"] if d["name"].endswith("encoder.layers.0.self_attn.q_proj"))
    assert row["format"] == "float8_e4m3fn" and row["shape"] == [768, 768]
    assert "encoder.layers.0.self_attn.q_proj" in text and "768 x 768" in text and "NF4" in text
    # 0.3.75's core knows FP8 but not bitsandbytes NF4: the hint comes from its QUANT_ALGOS
    from hybridquant.ops.capabilities import core_quant_algos

    algos = core_quant_algos()
    assert info["loading"]["stock"] is (False if algos is not None else None)
    assert "float8_e4m3fn" not in info["loading"].get("missing", [])
    assert str(tmp_path) not in text


def test_stock_hint_says_clip_text_encoders_need_the_pack(comfy):
    """The stock CLIP loader ignores .comfy_quant for CLIP text encoders (bench/RESULTS_ARCH.md): even a
    format the core knows gets 'needs the HybridQuant loaders' there, and stays 'stock reads it' elsewhere."""
    from hybridquant.nodes.fileinfo import stock_loadable

    algos = {"float8_e4m3fn"}
    clip = stock_loadable(["float8_e4m3fn"], algos, ["text_model.encoder.layers.0.mlp.fc1"])
    assert clip["stock"] is False and "CLIP" in clip["text"]
    unet = stock_loadable(["float8_e4m3fn"], algos, ["double_blocks.0.img_attn.qkv"])
    assert unet["stock"] is True
