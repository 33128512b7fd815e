"""Mixed formats and layer selection through the CLI: --custom-layers in every primary mode (incl. a
BNB 4-bit + FP8 file), exclusions, presets, --layer-config, --heur, metadata flags, --dry-run."""

from __future__ import annotations

import json

import pytest
import torch
from convert_helpers import decode, header_layers, load_all, rel_err, run_cli, write_checkpoint


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    p = tmp_path_factory.mktemp("mixed") / "tiny.safetensors"
    return p, write_checkpoint(p)


def formats_of(path) -> dict[str, str]:
    infos, _, _, _ = decode(path)
    return {layer: info.format for layer, info in infos.items()}


def test_bnb_plus_fp8_custom_layers(src, tmp_path):
    """Mixed file: BNB layers carry bitsandbytes keys, custom layers .comfy_quant + scales, header lists
    only the .comfy_quant layers; both decode close to the input (and BNB through bitsandbytes too)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    path, w = src
    out = tmp_path / "mixed.safetensors"
    run_cli("-i", path, "-o", out, "-q", "--simple", "--bnb-4bit", "--custom-layers", r"img_attn\.(qkv|proj)$",
            "--custom-type", "fp8", "--exclude-layers", "img_attn")  # custom wins over the exclusion
    infos, deq, md, tensors = decode(out)
    fm = {l: i.format for l, i in infos.items()}
    assert fm["double_blocks.0.img_attn.qkv"] == "float8_e4m3fn"
    assert fm["double_blocks.0.img_attn.proj"] == "float8_e4m3fn"
    assert fm["double_blocks.0.img_mlp.0"] == "bnb_nf4"
    assert header_layers(md).keys() == {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj"}
    assert "double_blocks.0.img_attn.qkv.weight_scale" in tensors
    assert "double_blocks.0.img_attn.qkv.weight.absmax" not in tensors
    assert "double_blocks.0.img_mlp.0.comfy_quant" not in tensors
    assert "double_blocks.0.img_mlp.0.weight.quant_state.bitsandbytes__nf4" in tensors
    for layer, d in deq.items():
        assert rel_err(d, w[f"{layer}.weight"]) < (0.04 if fm[layer].startswith("float8") else 0.17), layer
    layer = "single_blocks.0.linear1"
    qs = {k[len(layer) + 8:]: v for k, v in tensors.items() if k.startswith(f"{layer}.weight.")}
    ref = bnbf.dequantize_4bit(tensors[f"{layer}.weight"], bnbf.QuantState.from_dict(qs, device=torch.device("cpu")))
    assert torch.equal(ref.float(), deq[layer].to(torch.bfloat16).float())


@pytest.mark.parametrize("primary,custom", [(p, c) for p in (["--int8"], ["--mxfp8"], ["--nvfp4"], [])
                                             for c in ("int8", "mxfp8", "nvfp4", "fp8")
                                             if p != [f"--{c}"] and not (c == "fp8" and not p)])
def test_custom_type_in_every_primary_mode(src, tmp_path, primary, custom):
    path, w = src
    out = tmp_path / "o.safetensors"
    extra = ["--custom-scaling-mode", "block", "--custom-block-size", "32"] if custom == "int8" else []
    run_cli("-i", path, "-o", out, "-q", "--simple", *primary, "--custom-layers", "linear[12]$", "--custom-type", custom, *extra)
    fm = formats_of(out)
    want = {"fp8": "float8_e4m3fn", "int8": "int8_blockwise", "mxfp8": "mxfp8", "nvfp4": "nvfp4"}[custom]
    assert fm["single_blocks.0.linear1"] == fm["single_blocks.0.linear2"] == want
    prim = {"--int8": "int8_tensorwise", "--mxfp8": "mxfp8", "--nvfp4": "nvfp4"}.get(primary[0] if primary else "", "float8_e4m3fn")
    assert fm["double_blocks.0.img_mlp.0"] == prim
    if custom == "int8":
        _, _, md, _ = decode(out)
        assert header_layers(md)["single_blocks.0.linear1"]["group_size"] == 32


def test_presets_exclusions_and_heur(src, tmp_path):
    path, _ = src
    out = tmp_path / "o.safetensors"
    run_cli("-i", path, "-o", out, "-q", "--simple", "--flux1", "--exclude-layers", "txt_mod", "--heur", "--mxfp8")
    fm = formats_of(out)
    for kept in ("img_in", "time_in.in_layer", "final_layer.linear", "final_layer.adaLN_modulation.1",  # --flux1
                 "double_blocks.0.txt_mod.lin"):  # --exclude-layers
        assert kept not in fm
    assert fm["double_blocks.0.img_mlp.0"] == "mxfp8"
    tensors, _ = load_all(out)
    assert tensors["img_in.weight"].dtype == torch.bfloat16


def test_heur_skips_bad_shapes(tmp_path):
    from convert_helpers import make_weights
    from safetensors.torch import save_file

    layers = [("a.weight", (128, 128)), ("tiny.weight", (16, 32)), ("thin.weight", (4096, 8)), ("ragged.weight", (120, 200))]
    path = tmp_path / "h.safetensors"
    save_file(make_weights(layers=layers), str(path))
    out = tmp_path / "o.safetensors"
    proc = run_cli("-i", path, "-o", out, "--heur", "--dry-run")
    assert "heur:" in proc.stdout
    run_cli("-i", path, "-o", out, "-q", "--simple", "--heur")
    assert formats_of(out) == {"a": "float8_e4m3fn"}
    run_cli("-i", path, "-o", out, "-q", "--simple", "--overwrite")
    assert set(formats_of(out)) == {"a", "tiny", "thin", "ragged"}


def test_layer_config_most_specific_wins(src, tmp_path):
    path, _ = src
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({
        "_default": {"format": "int8", "scaling_mode": "row"},
        r"double_blocks\.\d+\.img_mlp": {"format": "mxfp8"},
        r"double_blocks\.0\.img_mlp\.2": {"format": "fp8", "scaling_mode": "block", "block_size": 64},
        "img_attn": {"format": "nvfp4"},
        "final_layer": "skip",
    }))
    out = tmp_path / "o.safetensors"
    run_cli("-i", path, "-o", out, "-q", "--simple", "--layer-config", cfg)
    fm = formats_of(out)
    assert fm["double_blocks.0.img_mlp.0"] == "mxfp8"
    assert fm["double_blocks.0.img_mlp.2"] == "float8_e4m3fn_blockwise"
    assert fm["double_blocks.0.img_attn.qkv"] == "nvfp4"
    assert fm["single_blocks.0.linear1"] == "int8_tensorwise"
    assert "final_layer.linear" not in fm and "final_layer.adaLN_modulation.1" not in fm
    _, _, md, _ = decode(out)
    hl = header_layers(md)
    assert hl["single_blocks.0.linear1"].get("per_row") is True
    assert hl["double_blocks.0.img_mlp.2"]["group_size"] == 64


def test_metadata_flags(src, tmp_path):
    path, _ = src
    out = tmp_path / "o.safetensors"
    run_cli("-i", path, "-o", out, "-q", "--simple", "--full_precision_matrix_mult", "--input_scale")
    tensors, md = load_all(out)
    hl = header_layers(md)
    assert all(d["full_precision_matrix_mult"] is True for d in hl.values())
    assert float(tensors["double_blocks.0.img_mlp.0.input_scale"]) == 1.0
    assert tensors["double_blocks.0.img_mlp.0.input_scale"].dtype == torch.float32
    run_cli("-i", path, "-o", out, "-q", "--simple", "--overwrite", "--no-comfy-quant")
    tensors, md = load_all(out)
    assert not any(k.endswith(".comfy_quant") for k in tensors) and header_layers(md)
    run_cli("-i", path, "-o", out, "-q", "--simple", "--overwrite", "--no-quant-metadata", "--comfy_quant")
    tensors, md = load_all(out)
    assert any(k.endswith(".comfy_quant") for k in tensors) and "_quantization_metadata" not in md
    assert md["modelspec.title"] == "tiny flux-like"


def test_dry_run_writes_nothing(src, tmp_path):
    path, _ = src
    out = tmp_path / "o.safetensors"
    proc = run_cli("-i", path, "-o", out, "--dry-run", "--flux1", "--report", tmp_path / "r.json")
    assert not out.exists() and not list(tmp_path.glob(".o.safetensors.partial-*"))
    assert "--flux1 preset" in proc.stdout and "double_blocks.0.img_mlp.0.weight" in proc.stdout
    assert "nothing written" in proc.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["dry_run"] and rep["bytes_out"] < rep["bytes_in"]


def test_report_json_and_summary(src, tmp_path):
    path, _ = src
    out = tmp_path / "o.safetensors"
    proc = run_cli("-i", path, "-o", out, "--simple", "--int8", "--custom-layers", "linear1", "--custom-type", "fp8",
                   "--report", tmp_path / "r.json")
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["formats"] == {"float8_e4m3fn": 1, "int8_tensorwise": 10}
    assert rep["bytes_out"] == out.stat().st_size
    assert set(rep["error_stats"]) == {"float8_e4m3fn", "int8_tensorwise"}
    assert "relative error int8_tensorwise" in proc.stdout and "converting" in proc.stderr


def _calibration_file(path, weights, layers):
    from hybridquant.converter.safetensors_writer import write_safetensors

    g = torch.Generator().manual_seed(3)
    t = {}
    for layer in layers:
        n = weights[f"{layer}.weight"].shape[1]
        x = torch.randn(512, n, generator=g) * torch.linspace(0.1, 3.0, n)  # uneven channel energy
        t[f"{layer}.input_xtx"] = x.T @ x / x.shape[0]
        t[f"{layer}.input_sqmean"] = x.square().mean(0)
        t[f"{layer}.input_absmax"] = x.abs().amax(0)
        t[f"{layer}.input_count"] = torch.tensor(x.shape[0])
    write_safetensors(path, t, {"hybridquant_calibration": "1", "source": "test"})


def test_calibration_flag(src, tmp_path):
    """--calibration selects the calibrated method, feeds per-layer statistics, and calibrates
    --input_scale; a calibrated method without statistics is a clear error listing the layers."""
    path, w = src
    layers = ["double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2"]
    calib = tmp_path / "calib.safetensors"
    _calibration_file(calib, w, layers)
    out = tmp_path / "o.safetensors"
    proc = run_cli("-i", path, "-o", out, "--method", "gptq", check=False)
    assert proc.returncode == 2 and "--calibration" in proc.stderr and "Traceback" not in proc.stderr
    run_cli("-i", path, "-o", out, "-q", "--custom-layers", "img_mlp", "--custom-type", "fp8", "--exclude-layers", ".",
            "--input_scale", "--calibration", calib, "--report", tmp_path / "r.json")
    rep = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert rep["double_blocks.0.img_mlp.0.weight"]["method"] == "gptq"
    assert rep["double_blocks.0.img_mlp.0.weight"]["rel_error"] < 0.06
    tensors, _ = load_all(out)
    absmax = float(_read(calib, "double_blocks.0.img_mlp.0.input_absmax").max())
    assert float(tensors["double_blocks.0.img_mlp.0.input_scale"]) == pytest.approx(absmax / 448, rel=1e-6)


def _read(path, key):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(key)


def test_already_quantized_layers_are_kept_with_their_metadata(src, tmp_path):
    """Converting a file that already holds FP8 layers: they are copied unchanged, keep their header
    entries, and the remaining float layers are quantized (here to INT8)."""
    path, w = src
    part = tmp_path / "part.safetensors"
    run_cli("-i", path, "-o", part, "-q", "--simple", "--custom-layers", "img_mlp", "--custom-type", "fp8",
            "--exclude-layers", ".")
    assert set(header_layers(load_all(part)[1])) == {"double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2"}
    out = tmp_path / "o.safetensors"
    run_cli("-i", part, "-o", out, "-q", "--simple", "--int8")
    fm = formats_of(out)
    assert fm["double_blocks.0.img_mlp.0"] == "float8_e4m3fn" and fm["single_blocks.0.linear1"] == "int8_tensorwise"
    hl = header_layers(load_all(out)[1])
    assert hl["double_blocks.0.img_mlp.0"] == {"format": "float8_e4m3fn"} and hl["single_blocks.0.linear1"]["format"] == "int8_tensorwise"
    a, b = load_all(part)[0], load_all(out)[0]
    assert torch.equal(a["double_blocks.0.img_mlp.0.weight"].view(torch.uint8), b["double_blocks.0.img_mlp.0.weight"].view(torch.uint8))
