"""Route logic: only files inside ComfyUI's registered model folders, header-only summaries.

Runs in-process against the real ``folder_paths`` of the ComfyUI tree (``comfy`` fixture), with the
diffusion_models / checkpoints folders pointed at temp dirs for the test. The same refusals are
checked over HTTP on a real server in tests/e2e/test_e2e_routes.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.comfyui


@pytest.fixture
def folders(comfy, tmp_path, monkeypatch):
    import folder_paths

    models = tmp_path / "models"
    dm = models / "diffusion_models"
    ck = models / "checkpoints"
    dm.mkdir(parents=True)
    ck.mkdir(parents=True)
    table = dict(folder_paths.folder_names_and_paths)
    table["diffusion_models"] = ([str(dm)], table["diffusion_models"][1])
    table["checkpoints"] = ([str(ck)], table["checkpoints"][1])
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    outside = tmp_path / "outside"
    outside.mkdir()
    return folder_paths, dm, ck, outside


def _mixed_file(path):
    """A small mixed file: one BNB-NF4 layer (keys as bitsandbytes writes them), one FP8 layer, one bf16."""
    qs = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 32]}).encode()
    cq = json.dumps({"format": "float8_e4m3fn"}).encode()
    t = {
        "blocks.0.attn.weight": torch.zeros(1024, 1, dtype=torch.uint8),
        "blocks.0.attn.weight.absmax": torch.ones(32),
        "blocks.0.attn.weight.quant_map": torch.zeros(16),
        "blocks.0.attn.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(qs), dtype=torch.uint8),
        "blocks.0.attn.bias": torch.zeros(64, dtype=torch.bfloat16),
        "blocks.1.mlp.weight": torch.zeros(32, 32, dtype=torch.float8_e4m3fn),
        "blocks.1.mlp.weight_scale": torch.tensor(1.0),
        "blocks.1.mlp.comfy_quant": torch.tensor(list(cq), dtype=torch.uint8),
        "final.weight": torch.zeros(16, 32, dtype=torch.bfloat16),
        "norm.weight": torch.ones(32, dtype=torch.bfloat16),
    }
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                  "layers": {"blocks.1.mlp": {"format": "float8_e4m3fn"}}})}
    save_file(t, str(path), metadata=meta)


def test_summary_of_a_mixed_file(folders):
    from hybridquant.nodes.routes import file_info

    fp, dm, _, _ = folders
    _mixed_file(dm / "mixed.safetensors")
    status, body = file_info(fp, "diffusion_models", "mixed.safetensors")
    assert status == 200, body
    assert body["formats"] == {"bf16": 1, "bnb_nf4": 1, "float8_e4m3fn": 1}
    assert body["labels"]["bnb_nf4"].startswith("NF4") and body["quantized_formats"] == ["bnb_nf4", "float8_e4m3fn"]
    assert body["layer_count"] == 3 and body["quantized_layers"] == 2
    assert body["size_bytes"] == os.path.getsize(dm / "mixed.safetensors")
    names = [d["name"] for d in body["layers"]]
    assert names == ["blocks.0.attn", "blocks.1.mlp", "final"]
    assert [body["format_legend"][i] for i in body["format_map"]] == ["bnb_nf4", "float8_e4m3fn", "bf16"]
    # the running core (0.3.75: FP8 names only) decides; NF4 is not among its QUANT_ALGOS
    from hybridquant.ops.capabilities import core_quant_algos

    if core_quant_algos() is not None:
        assert body["loading"]["stock"] is False and body["loading"]["missing"] == ["bnb_nf4"]
    assert body["fast_path"]["available"] is True, body["fast_path"]
    assert body["fast_path"]["formats"]["bnb_nf4"]["fast"] is False  # CPU: dequantize per call
    assert "bf16" not in body["fast_path"]["formats"]  # unquantized layers are not a "path" question


def test_subfolder_file_is_served(folders):
    from hybridquant.nodes.routes import file_info

    fp, dm, _, _ = folders
    (dm / "sub").mkdir()
    _mixed_file(dm / "sub" / "m.safetensors")
    status, body = file_info(fp, "diffusion_models", "sub/m.safetensors")
    assert status == 200 and body["name"] == "sub/m.safetensors"


@pytest.mark.parametrize("name", [
    "../outside/secret.safetensors", "sub/../../outside/secret.safetensors", "..\\outside\\secret.safetensors",
    "/etc/passwd", "\\\\server\\share\\x.safetensors", "C:/x.safetensors", "./mixed.safetensors",
    "mixed.ckpt", "", "a\x00b.safetensors",
])
def test_refuses_traversal_absolute_and_odd_names(folders, name):
    from hybridquant.nodes.routes import file_info

    fp, dm, _, outside = folders
    _mixed_file(dm / "mixed.safetensors")
    _mixed_file(outside / "secret.safetensors")
    status, body = file_info(fp, "diffusion_models", name)
    assert status == 400, (name, body)
    assert "error" in body and str(outside) not in body["error"]


def test_refuses_absolute_path_to_a_real_model(folders):
    from hybridquant.nodes.routes import file_info

    fp, dm, _, _ = folders
    _mixed_file(dm / "mixed.safetensors")
    status, _ = file_info(fp, "diffusion_models", str(dm / "mixed.safetensors"))
    assert status == 400


def test_symlinked_model_file_is_served_as_comfyui_loads_it(folders):
    """Users keep models on other disks through symlinks in the model folder: ComfyUI's loaders follow
    them, so the routes do too; names that leave the folder are still refused (above)."""
    from hybridquant.nodes.routes import file_info

    fp, dm, _, outside = folders
    _mixed_file(outside / "big.safetensors")
    os.symlink(outside / "big.safetensors", dm / "link.safetensors")
    os.symlink(outside, dm / "linkdir")
    status, body = file_info(fp, "diffusion_models", "link.safetensors")
    assert status == 200 and body["file"] == "link.safetensors" and str(outside) not in json.dumps(body)
    assert file_info(fp, "diffusion_models", "linkdir/big.safetensors")[0] == 200
    assert file_info(fp, "diffusion_models", "linkdir/../../outside/big.safetensors")[0] == 400


def test_formats_and_plan_preview(folders):
    from hybridquant.converter.formats import registry
    from hybridquant.nodes import quantize_options as qo
    from hybridquant.nodes.routes import formats_payload, plan_preview

    body = formats_payload()
    names = [f["name"] for f in body["formats"]]
    assert set(registry.format_names()) <= set(names)
    assert all(f["color"].startswith("#") and f["label"] for f in body["formats"])
    assert "fp8" in body["search_aliases"]["HybridQuantQuantizeModel"]
    assert body["name_words"] == registry.name_words() and "nf4" in body["name_words"]
    assert body["choices"]["legacy"]["bnb_nf4"] in body["choices"]["format"]
    assert any("Hybrid MXFP8" in c for c in body["choices"]["format"])

    fp, dm, _, _ = folders
    save_file({"a.weight": torch.zeros(64, 64, dtype=torch.bfloat16), "b.weight": torch.zeros(32, 64),
               "emb.weight": torch.zeros(4, dtype=torch.bfloat16)}, str(dm / "plain.safetensors"))
    nf4 = qo.legacy_map()["bnb_nf4"]
    fp8 = qo.legacy_map()["fp8 tensorwise"]
    status, out = plan_preview(fp, {"folder": "diffusion_models", "name": "plain.safetensors",
                                    "settings": {"format": nf4, "custom_layers": "^b$", "custom_format": fp8}})
    assert status == 200, out
    rows = {r["name"]: r for r in out["layers"]}
    assert rows["a"]["format"] == "bnb_nf4" and rows["b"]["format"] == "float8_e4m3fn"
    assert rows["b"]["reason"] == "matches custom_layers" and rows["a"]["reason"] == "the main format"
    status, out = plan_preview(fp, {"folder": "diffusion_models", "name": "plain.safetensors",
                                    "settings": {"format": nf4, "custom_layers": "(("}})
    assert status == 400 and out["input"] == "custom_layers"
    status, out = plan_preview(fp, {"folder": "diffusion_models", "name": "plain.safetensors",
                                    "settings": {"format": nf4, "custom_layers": "nothing_matches"}})
    assert status == 200 and out["warnings"] and "matched no layer" in out["warnings"][0]


def test_plan_preview_budget(folders):
    """A target_size in the settings: the preview says what the budget chooses (layers per format, bytes,
    expected error) and bad values of the issue-14 inputs are 400s naming their input."""
    from hybridquant.nodes import quantize_options as qo
    from hybridquant.nodes.routes import plan_preview

    fp, dm, _, _ = folders
    g = torch.Generator().manual_seed(0)
    save_file({f"l{i}.weight": (torch.randn(64, 128, generator=g) * (1 + i)).to(torch.bfloat16) for i in range(4)},
              str(dm / "budget.safetensors"))
    nf4 = qo.legacy_map()["bnb_nf4"]
    req = {"folder": "diffusion_models", "name": "budget.safetensors"}
    status, out = plan_preview(fp, {**req, "settings": {"format": nf4, "target_size": "6bpw"}})
    assert status == 200, out
    b = out["budget"]
    assert sum(f["layers"] for f in b["formats"]) == 4 and b["bits_per_weight"] <= 6.0
    assert sum(f["bytes"] for f in b["formats"]) == b["layer_bytes"] and b["expected_error"] >= 0
    labels = {f["label"] for f in b["formats"]}
    assert {r["label"] for r in out["layers"]} <= labels and sum(out["counts"].values()) == 4
    status, out = plan_preview(fp, {**req, "settings": {"format": nf4, "target_size": "30kB"}})
    assert status == 200 and out["budget"]["file_bytes"] <= 30_000, out
    for settings, field in (({"target_size": "lots"}, "target_size"), ({"svd_rank": -1}, "svd_rank"),
                            ({"svd_rank": "x"}, "svd_rank"), ({"rotate": "fourier"}, "rotate"),
                            ({"target_size": "10"}, "target_size")):
        status, out = plan_preview(fp, {**req, "settings": {"format": nf4, **settings}})
        assert status in (400, 422) and out["input"] == field, (settings, status, out)


def test_symlink_inside_the_folder_is_fine(folders):
    from hybridquant.nodes.routes import file_info

    fp, dm, _, _ = folders
    _mixed_file(dm / "real.safetensors")
    os.symlink(dm / "real.safetensors", dm / "alias.safetensors")
    assert file_info(fp, "diffusion_models", "alias.safetensors")[0] == 200


def test_refuses_non_model_folders_and_missing_files(folders):
    from hybridquant.nodes.routes import file_info

    fp, dm, _, _ = folders
    _mixed_file(dm / "mixed.safetensors")
    assert file_info(fp, "custom_nodes", "mixed.safetensors")[0] == 400
    assert file_info(fp, "no_such_folder", "mixed.safetensors")[0] == 400
    # a file of another model folder is not served through this one
    assert file_info(fp, "checkpoints", "mixed.safetensors")[0] == 404
    assert file_info(fp, "diffusion_models", "nope.safetensors")[0] == 404


def test_not_safetensors_is_a_clear_error_without_server_paths(folders):
    from hybridquant.nodes.routes import file_info

    fp, dm, _, _ = folders
    (dm / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    status, body = file_info(fp, "diffusion_models", "junk.safetensors")
    assert status == 422
    assert body["error"].startswith("junk.safetensors: ") and str(dm) not in body["error"]
