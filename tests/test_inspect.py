"""converter.inspect_file: every layer of a file from its header and metadata tensors only."""

from __future__ import annotations

import os

import torch
from convert_helpers import run_cli, write_checkpoint
from safetensors.torch import save_file

from hybridquant.converter import inspect_file
from hybridquant.converter.formats import get_codec


def test_mixed_file_layers_formats_shapes_and_bytes(tmp_path):
    src, out = tmp_path / "in.safetensors", tmp_path / "mixed.safetensors"
    w = write_checkpoint(src)
    run_cli("-i", src, "-o", out, "--bnb-4bit", "--custom-layers", r"attn\.qkv$", "--custom-type", "fp8",
            "--simple", "-q")
    fi = inspect_file(out)
    by_name = {d.name: d for d in fi.layers}
    qkv = by_name["double_blocks.0.img_attn.qkv"]
    assert qkv.format == "float8_e4m3fn" and qkv.quantized and qkv.shape == (192, 128)
    ragged = by_name["double_blocks.0.txt_mod.lin"]  # bitsandbytes: logical shape from the quant state
    assert ragged.format == "bnb_nf4" and ragged.shape == (96, 72) and ragged.options["blocksize"] == 64
    # img_in / final_layer.linear: ComfyUI's model detection reads their shapes, so 4-bit leaves them in bf16
    assert by_name["img_in"].format == "bf16" and by_name["final_layer.linear"].format == "bf16"
    assert fi.formats() == {"bnb_nf4": len(fi.layers) - 3, "float8_e4m3fn": 1, "bf16": 2}
    # every tensor of the file is counted once: in a layer or among the others
    total = sum(d.nbytes for d in fi.layers) + fi.other_bytes
    from hybridquant.converter.safetensors_io import read_header

    infos, _ = read_header(out)
    assert total == sum(i.nbytes for i in infos.values())
    assert fi.other_tensors == 1  # the query_norm scale
    assert len(fi.layers) == sum(1 for k, t in w.items() if k.endswith(".weight") and t.ndim == 2)


def test_plain_and_padded_layers(tmp_path):
    codec = get_codec("nvfp4")
    q = codec.quantize(torch.randn(40, 72))
    sd = {"a.weight": torch.randn(8, 4, dtype=torch.bfloat16), **{f"b.{k}": v for k, v in q.items()}}
    path = tmp_path / "x.safetensors"
    from hybridquant.converter.metadata import build_header

    save_file(sd, str(path), metadata=build_header({"b": {"format": "nvfp4"}}))
    fi = inspect_file(path)
    a, b = fi.layers
    assert (a.format, a.quantized, a.shape) == ("bf16", False, (8, 4))
    # header-only NVFP4 without orig_shape: the padded storage does not tell the logical shape
    assert (b.format, b.quantized, b.shape) == ("nvfp4", True, None)


def test_cache_follows_the_file(tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({"a.weight": torch.zeros(4, 4)}, str(path))
    assert inspect_file(path).formats() == {"fp32": 1}
    save_file({"a.weight": torch.zeros(4, 4, dtype=torch.float16), "b.weight": torch.zeros(2, 2)}, str(path))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert inspect_file(path).formats() == {"fp16": 1, "fp32": 1}
