""""Collect Calibration (HybridQuant)" against the real ComfyUI (CPU): a real sampling run of a tiny
SD3 MMDiT (ComfyUI's own model class, tests/e2e/synthetic.py) records statistics whose names are the
diffusion_models file's layer names and whose shapes fit its weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.comfyui


@pytest.fixture
def env(comfy, tmp_path, monkeypatch):
    import folder_paths
    from e2e.synthetic import sd3_mmdit_state_dict

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    table = dict(folder_paths.folder_names_and_paths)
    table.pop("calibration", None)
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    sd = sd3_mmdit_state_dict(depth=2, seed=3)
    save_file(sd, str(tmp_path / "tiny.safetensors"))
    return tmp_path, sd


def _sample(model, seed):
    import comfy.sample

    g = torch.Generator().manual_seed(seed)
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
    cond = [[torch.randn(1, 5, 4096, generator=g) * 0.5, {"pooled_output": torch.randn(1, 2048, generator=g)}]]
    neg = [[torch.zeros(1, 5, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
    return comfy.sample.sample(model, noise, 2, 2.0, "euler", "simple", cond, neg, latent, seed=seed)


def test_sampling_runs_record_statistics(env):
    from hybridquant.converter.rounding.calibration import CalibrationFile
    from hybridquant.nodes.backend import load_diffusion_model
    from hybridquant.nodes.calibration import NODES, CollectCalibration, calibration_files

    tmp, sd = env
    assert CollectCalibration in NODES
    model, _ = load_diffusion_model(str(tmp / "tiny.safetensors"))
    out = CollectCalibration.execute(model, "sub/tiny_calib", 1, 4096, True)
    rec_model, path = out.result if hasattr(out, "result") else out.args
    assert path.endswith("sub/tiny_calib.safetensors") and str(tmp / "models" / "calibration") in path

    plain = _sample(model, 1)  # the original MODEL does not record
    import os

    assert not os.path.exists(path)
    first = _sample(rec_model, 1)
    assert torch.allclose(first, plain)  # recording does not change the result
    linears = {k[:-len(".weight")]: v.shape[1] for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2}
    with CalibrationFile(path) as f:
        count1 = int(f.stats_for("joint_blocks.0.x_block.attn.qkv", linears["joint_blocks.0.x_block.attn.qkv"])["count"])
        assert set(f.layers) <= set(linears)
        f.check({k: v for k, v in linears.items() if k in f.layers})  # every recorded layer fits its weight
        assert "joint_blocks.1.x_block.mlp.fc2" in f.layers
        s = f.stats_for("joint_blocks.1.x_block.mlp.fc2", linears["joint_blocks.1.x_block.mlp.fc2"])
        assert "xtx" in s and torch.allclose(torch.diagonal(s["xtx"]), s["sqmean"], rtol=1e-4, atol=1e-6)
    _sample(rec_model, 2)  # a second run accumulates into the same file
    with CalibrationFile(path) as f:
        assert int(f.stats_for("joint_blocks.0.x_block.attn.qkv", 128)["count"]) == 2 * count1
    assert "sub/tiny_calib.safetensors" in calibration_files()


def test_bad_filename_is_refused(env):
    from hybridquant.nodes.calibration import _target_path

    for bad in ("../x", "/abs", "", "a/../../b"):
        with pytest.raises(ValueError, match="calibration filename"):
            _target_path(bad)
