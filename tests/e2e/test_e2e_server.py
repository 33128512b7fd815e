"""The pack loads into a real ComfyUI server: nodes in /object_info, web extension served, clean log."""

from __future__ import annotations

import re

import pytest

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

NODES = {
    "HybridQuantQuantizeModel": ("Quantize Model (HybridQuant)",
                                 {"model", "format", "preset", "custom_layers", "custom_format", "rounding",
                                  "save", "filename_prefix", "calibration"}, ["MODEL", "STRING"]),
    "HybridQuantLoadDiffusionModel": ("Load Diffusion Model (HybridQuant)", {"unet_name"}, ["MODEL"]),
    "HybridQuantLoadCheckpoint": ("Load Checkpoint (HybridQuant)", {"ckpt_name"}, ["MODEL", "CLIP", "VAE"]),
    "HybridQuantLoadCLIP": ("Load CLIP (HybridQuant)", {"clip_name", "type"}, ["CLIP"]),
    "HybridQuantInfo": ("Quantization Info (HybridQuant)", {"file"}, ["STRING"]),
    "HybridQuantCollectCalibration": ("Collect Calibration (HybridQuant)", set(), ["MODEL", "STRING"]),
}


def test_object_info_lists_every_node_with_inputs(comfy_server):
    status, info = comfy_server.get("/object_info")
    assert status == 200
    for node_id, (display, inputs, outputs) in NODES.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        node = info[node_id]
        assert node["display_name"] == display
        assert node["category"] == "HybridQuant"
        got = set(node["input"].get("required", {})) | set(node["input"].get("optional", {}))
        assert inputs <= got, f"{node_id}: inputs {sorted(got)} lack {sorted(inputs - got)}"
        assert node["output"] == outputs
        for name in inputs:
            spec = (node["input"].get("required", {}) | node["input"].get("optional", {}))[name]
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert node.get("description")
        got_all = set(node["input"].get("required", {})) | set(node["input"].get("optional", {}))
        assert "ops" not in got_all, f"{node_id}: the ops input offered choices that all do the same"
    q = info["HybridQuantQuantizeModel"]["input"]["required"]
    fmt = q["format"]
    options = fmt[1]["options"] if fmt[0] == "COMBO" else fmt[0]
    assert any(o.startswith("NF4") for o in options) and any(o.startswith("Hybrid MXFP8") for o in options)
    assert fmt[1]["default"].startswith("NF4")  # CPU server: no fast 8-bit kernels here
    assert "bits per weight" in fmt[1]["tooltip"] and "% of bf16" in fmt[1]["tooltip"]
    # the bundled example model is offered to the loaders (the example workflows use it)
    unet = info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert "hybridquant_example_sd3_tiny.safetensors" in unet


def test_pack_loaded_without_errors_or_warnings(comfy_server):
    # Start-up only: the server is shared, and other tests queue broken files on purpose.
    log = comfy_server.log_text().split("got prompt", 1)[0]
    assert re.search(r"\d+\.\d+ seconds: .*ComfyUI-HybridQuant", log), "pack not in the import-times list:\n" + log[-3000:]
    assert "(IMPORT FAILED)" not in log
    bad = [ln for ln in log.splitlines()
           if ("HybridQuant" in ln or "hybridquant" in ln) and re.search(r"(?i)warn|error|traceback|failed", ln)]
    assert not bad, "pack logged warnings/errors:\n" + "\n".join(bad)
    assert "Cannot import" not in log


def test_web_extension_is_served(comfy_server):
    status, exts = comfy_server.get("/extensions")
    assert status == 200
    ours = [e for e in exts if "ComfyUI-HybridQuant" in e]
    assert any(e.endswith("hybridquant.js") for e in ours), exts
