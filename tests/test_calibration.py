"""Calibration statistics: hook collection, sidecar file, loader errors."""

from __future__ import annotations

import pytest
import torch

from hybridquant.converter.rounding.calibration import CalibrationError, CalibrationFile, Collector, collect, load_stats
from hybridquant.converter.safetensors_writer import write_safetensors


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 5)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(3, 6)

    def forward(self, x):
        x = self.head(self.blocks[0](x))
        return self.blocks[1](x)


def small_integer_batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(-4, 5, (2, 7, 6), generator=g).double() for _ in range(3)]


def test_hooks_give_exact_xtx_of_known_inputs(tmp_path):
    torch.manual_seed(0)
    net = Net().double()
    batches = small_integer_batches()
    col = collect(net, batches, dtype=torch.float64)
    x = torch.cat([b.reshape(-1, 6) for b in batches])
    sd = col.state_dict()
    # first layer: inputs are the batches themselves (integers: exact in any order of summation)
    assert torch.equal(sd["blocks.0.fc1.input_xtx"].double(), (x.T @ x / x.shape[0]).float().double())
    assert torch.equal(sd["blocks.0.fc1.input_absmax"], x.abs().amax(0).float())
    assert int(sd["blocks.0.fc1.input_count"]) == 42
    # a deeper layer: its input is recomputed directly
    with torch.no_grad():
        h = torch.relu(net.blocks[0].fc1(x))
    ref = (h.T @ h / h.shape[0]).float()
    assert torch.allclose(sd["blocks.0.fc2.input_xtx"], ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(sd["blocks.0.fc2.input_sqmean"], torch.diagonal(ref), rtol=1e-6)
    assert set(k.rsplit(".", 1)[0] for k in sd) == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"}
    # hooks are gone after the context
    n = col.acc["head"].count
    net(batches[0])
    assert col.acc["head"].count == n


def test_save_load_roundtrip_and_prefix_map(tmp_path):
    net = Net()
    col = collect(net, [torch.randn(4, 6)], prefix_map={"": "model.diffusion_model."}, include=r"blocks\.0\.")
    path = col.save(tmp_path / "calib.safetensors", source="test")
    with CalibrationFile(path) as f:
        assert f.layers == ["model.diffusion_model.blocks.0.fc1", "model.diffusion_model.blocks.0.fc2"]
        # the converter asks with the checkpoint's names; common prefixes are resolved
        s = f.stats_for("blocks.0.fc1", 6)
        assert set(s) == {"xtx", "sqmean", "absmax", "count"} and s["xtx"].shape == (6, 6)
        s2 = f.stats_for("model.diffusion_model.blocks.0.fc2", 5)
        assert int(s2["count"]) == 4
    with CalibrationFile(path, prefix_map={"unet.": "model.diffusion_model."}) as f:
        assert f.stats_for("unet.blocks.0.fc2", 5)["xtx"].shape == (5, 5)
    stats = load_stats(path, {"blocks.0.fc1": 6})
    assert torch.equal(stats["blocks.0.fc1"]["absmax"], col.state_dict()["model.diffusion_model.blocks.0.fc1.input_absmax"])


def test_missing_and_mismatched_layers_give_clear_errors(tmp_path):
    net = Net()
    path = collect(net, [torch.randn(4, 6)]).save(tmp_path / "c.safetensors")
    with CalibrationFile(path) as f:
        with pytest.raises(CalibrationError, match=r"no calibration statistics for layer 'blocks\.5\.fc1'"):
            f.stats_for("blocks.5.fc1", 6)
        with pytest.raises(CalibrationError, match=r"'blocks\.0\.fc1'.*shape \(6,\).*12 input features"):
            f.stats_for("blocks.0.fc1", 12)
        with pytest.raises(CalibrationError) as e:
            f.check({"blocks.0.fc1": 6, "blocks.9.fc2": 5, "head": 4})
        msg = str(e.value)
        assert "2 of 3 layers" in msg and "'blocks.9.fc2' missing" in msg and "'head'" in msg
        f.check({"blocks.0.fc1": 6, "head": 3})  # fits: no error


def test_diag_only_layers_and_bad_files(tmp_path):
    net = Net()
    col = collect(net, [torch.randn(4, 6)], max_full_dim=5)
    path = col.save(tmp_path / "d.safetensors")
    with CalibrationFile(path) as f:
        assert "xtx" not in f.stats_for("blocks.0.fc1", 6)  # 6 inputs > max_full_dim
        assert "xtx" in f.stats_for("blocks.0.fc2", 5)
    other = write_safetensors(tmp_path / "model.safetensors", {"a.weight": torch.zeros(2, 2)})
    with pytest.raises(CalibrationError, match="not a calibration file"):
        CalibrationFile(other)
    with pytest.raises(CalibrationError, match="calibration file"):
        CalibrationFile(tmp_path / "nope.safetensors")
    bad = write_safetensors(tmp_path / "nan.safetensors",
                            {"l.input_sqmean": torch.tensor([float("nan"), 1.0]), "l.input_absmax": torch.ones(2),
                             "l.input_count": torch.tensor(3)}, metadata={"hybridquant_calibration": "1"})
    with CalibrationFile(bad) as f, pytest.raises(CalibrationError, match="NaN or Inf"):
        f.stats_for("l", 2)
    with pytest.raises(CalibrationError, match="no calibration statistics were collected"):
        Collector(net).save(tmp_path / "empty.safetensors")


def test_prepare_calibration_for_the_converter(tmp_path):
    from hybridquant.converter.plan import LayerPlan
    from hybridquant.converter.rounding.calibration import prepare_calibration

    net = Net()
    x = torch.randn(8, 6) * 3
    path = collect(net, [x]).save(tmp_path / "c.safetensors")
    plans = [LayerPlan("blocks.0.fc1.weight", (5, 6), "float32", "blocks.0.fc1", "float8_e4m3fn", {"input_scale": 1.0}, "gptq"),
             LayerPlan("blocks.0.fc1.bias", (5,), "float32"),
             LayerPlan("head.weight", (6, 3), "float32", "head", "int8_tensorwise", {}, "default")]
    cf = prepare_calibration(plans, path)
    assert plans[0].opts["input_scale"] == pytest.approx(float(x.abs().max()) / 448.0)
    assert int(cf.stats_for("blocks.0.fc1", 6)["count"]) == 8
    with pytest.raises(CalibrationError, match="needs calibration statistics"):
        prepare_calibration(plans, None)
    assert prepare_calibration(plans[1:], None) is None  # no gptq layer: no file needed
    plans.append(LayerPlan("extra.weight", (4, 9), "float32", "extra", "nvfp4", {}, "gptq"))
    with pytest.raises(CalibrationError, match="'extra' missing"):
        prepare_calibration(plans, path)
