""""Quantize Model" in-process against the real ComfyUI (CPU): file naming, caching, Cancel, input checks.

The node runs exactly as ComfyUI calls it (``execute`` classmethod) on a MODEL loaded by our own
loader from a tiny SD3 MMDiT built from ComfyUI's model class (tests/e2e/synthetic.py).
"""

from __future__ import annotations

import os

import pytest
from safetensors.torch import save_file

pytestmark = pytest.mark.comfyui

# old option values on purpose: workflows saved before the registry-derived option texts still run
INPUTS = dict(format="bnb_nf4", preset="none", custom_layers=r"attn\.qkv", custom_format="fp8 tensorwise",
              rounding="rtn", save=True, filename_prefix="hq_test/tiny")


@pytest.fixture
def env(comfy, tmp_path, monkeypatch):
    import folder_paths
    from e2e.synthetic import sd3_mmdit_state_dict

    dm = tmp_path / "diffusion_models"
    dm.mkdir()
    table = dict(folder_paths.folder_names_and_paths)
    table["diffusion_models"] = ([str(dm)], table["diffusion_models"][1])
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    save_file(sd3_mmdit_state_dict(depth=2, seed=3), str(dm / "tiny.safetensors"))
    import weakref

    from hybridquant.nodes import quantize_run

    monkeypatch.setattr(quantize_run, "_RESULTS", weakref.WeakValueDictionary())
    monkeypatch.setattr(quantize_run, "_SUMMARIES", {})
    monkeypatch.setattr(quantize_run, "_SAVED", {})
    return dm


def _model(dm):
    from hybridquant.nodes.backend import load_diffusion_model

    model, _ = load_diffusion_model(str(dm / "tiny.safetensors"))
    return model


def _run(model, **kw):
    from hybridquant.nodes.quantize import QuantizeModel

    out = QuantizeModel.execute(model, **(INPUTS | kw))
    return out.result if hasattr(out, "result") else out.args


def test_never_overwrites_and_does_not_quantize_twice(env):
    import gc

    from hybridquant.nodes.quantize import QuantizeModel
    from hybridquant.nodes.quantize_run import quantization_runs

    (env / "hq_test").mkdir()
    squatter = env / "hq_test" / "tiny_00001.safetensors"
    squatter.write_bytes(b"someone else's file")
    model = _model(env)
    runs0 = quantization_runs()
    qmodel, summary = _run(model)
    assert squatter.read_bytes() == b"someone else's file"
    saved = env / "hq_test" / "tiny_00002.safetensors"
    assert saved.is_file() and "hq_test/tiny_00002.safetensors" in summary and str(env) not in summary
    assert quantization_runs() == runs0 + 1
    assert "NF4" in summary and "FP8" in summary and "Quantized" in summary

    # Same weights (a freshly loaded MODEL object) and options: reused, no new file.
    fp1 = QuantizeModel.fingerprint_inputs(**INPUTS)
    held, summary2 = _run(_model(env))
    assert "nothing quantized again" in summary2 and held is qmodel
    # The output MODEL is held only weakly: once nothing else holds it, the saved file is reused.
    del qmodel, held
    gc.collect()
    _, summary2b = _run(_model(env))
    assert "its saved file was loaded" in summary2b
    assert quantization_runs() == runs0 + 1
    assert sorted(p.name for p in (env / "hq_test").iterdir()) == ["tiny_00001.safetensors", "tiny_00002.safetensors"]

    # The saved file was deleted: ComfyUI must see a change (fingerprint) and the node re-quantizes.
    os.unlink(saved)
    assert QuantizeModel.fingerprint_inputs(**INPUTS) != fp1
    _, summary3 = _run(model)
    assert quantization_runs() == runs0 + 2 and "quantized again" not in summary3
    assert saved.is_file()


def test_quantized_model_output_samples_like_the_saved_file(env, comfy):
    import torch

    from hybridquant.nodes.backend import load_diffusion_model

    qmodel, summary = _run(_model(env))
    saved = env / "hq_test" / "tiny_00001.safetensors"
    reloaded, ops_class = load_diffusion_model(str(saved))
    assert ops_class.__name__ == "HybridQuantOps"
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 4096, generator=torch.Generator().manual_seed(1))
    y = torch.randn(1, 2048, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.5])
    outs = []
    for m in (qmodel, reloaded):
        comfy.model_management.load_models_gpu([m])
        with torch.no_grad():
            outs.append(m.model.apply_model(x, t, c_crossattn=ctx, y=y).float())
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


def test_cancel_writes_nothing(env, comfy):
    import comfy.model_management as mm

    from hybridquant.nodes.quantize_run import quantization_runs

    model = _model(env)
    runs0 = quantization_runs()
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _run(model)
    finally:
        mm.interrupt_current_processing(False)
    assert quantization_runs() == runs0
    assert not (env / "hq_test").exists() or not list((env / "hq_test").iterdir())


def test_validate_inputs_checks_only_the_regex_so_comfyui_keeps_its_own_checks(comfy):
    """ComfyUI skips its own combo/range checks for every input ``validate_inputs`` takes, and puts a
    failing check's message on each of them: the node's check takes custom_layers alone."""
    import inspect

    from hybridquant.nodes.quantize import QuantizeModel

    assert list(inspect.signature(QuantizeModel.validate_inputs).parameters) == ["custom_layers"]
    res = QuantizeModel.validate_inputs(custom_layers="attn((")
    assert isinstance(res, str) and res.startswith("invalid regex 'attn(('"), res
    assert QuantizeModel.validate_inputs(custom_layers=r"attn\.qkv") is True
    assert QuantizeModel.validate_inputs(custom_layers=None) is True  # linked input


@pytest.mark.parametrize("kw, msg", [
    ({"filename_prefix": "../escape"}, "filename_prefix"),
    ({"filename_prefix": "/abs/path"}, "filename_prefix"),
    ({"filename_prefix": "C:/x"}, "filename_prefix"),
    ({"format": "float128"}, "format"),
    ({"rounding": "gptq"}, "calibration"),
])
def test_run_checks_settings_before_reading_weights(comfy, kw, msg):
    """Checks that need several inputs run first in the node's run, before the MODEL is touched (a
    MODEL of None would fail on first use), with a short builtin error type naming the input."""
    from hybridquant.nodes.quantize import QuantizeModel

    with pytest.raises(ValueError) as e:
        QuantizeModel.execute(None, **(INPUTS | kw))
    assert type(e.value) is ValueError and str(e.value).startswith(msg), str(e.value)


def test_zero_layer_runs_are_errors_that_say_why(env, comfy):
    """An fp8-loaded model (UNETLoader weight_dtype), an already-quantized one, and options that leave
    nothing to quantize are refused with the reason; a regex that matches nothing is a warning."""
    import comfy.sd
    import torch

    from hybridquant.nodes.backend import load_diffusion_model

    fp8 = comfy.sd.load_diffusion_model(str(env / "tiny.safetensors"), model_options={"dtype": torch.float8_e4m3fn})
    with pytest.raises(ValueError, match=r"nothing to quantize.*weight_dtype"):
        _run(fp8)
    quantized = env / "hq_test"
    _run(_model(env))
    q, _ = load_diffusion_model(str(next(quantized.iterdir())))
    with pytest.raises(ValueError, match="already quantized"):
        _run(q)
    _, summary = _run(_model(env), custom_layers="no_such_layer", save=False)
    assert "custom_layers 'no_such_layer' matched no layer" in summary


def test_save_off_writes_nothing(env):
    _, summary = _run(_model(env), save=False)
    assert "not saved" in summary
    assert not (env / "hq_test").exists()


def test_calibration_choice_and_fingerprint(env, comfy, tmp_path, monkeypatch):
    """A calibration file listed by the node is resolved inside models/calibration only, and a
    change of that file (more recorded runs) changes the node's fingerprint."""
    import folder_paths

    from hybridquant.nodes import quantize, quantize_run

    cal = tmp_path / "calibration"
    cal.mkdir()
    table = dict(folder_paths.folder_names_and_paths)
    table["calibration"] = ([str(cal)], {".safetensors"})
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    f = cal / "stats.safetensors"
    save_file({"x": __import__("torch").zeros(1)}, str(f))
    assert "stats.safetensors" in quantize._calibration_choices()
    assert quantize_run.calibration_path("stats.safetensors") == str(f)
    with pytest.raises(ValueError):
        quantize_run.calibration_path("../diffusion_models/tiny.safetensors")
    kw = INPUTS | {"save": False, "rounding": "gptq", "calibration": "stats.safetensors"}
    fp1 = quantize.QuantizeModel.fingerprint_inputs(**kw)
    os.utime(f, ns=(1, 1))
    assert quantize.QuantizeModel.fingerprint_inputs(**kw) != fp1


def test_every_node_input_parses_in_this_cores_v3_executor(comfy):
    """Each node's inputs go through the executor's own V3 input parsing (0.33's
    ``get_finalized_class_inputs``, which looks each type up in a dict: a list type failed every prompt
    with "unhashable type: 'list'"); a combo's type is its option list only where the core does not
    check V3 combos itself (0.3.75)."""
    from comfy_api.latest import _io

    from hybridquant import nodes
    from hybridquant.nodes._api import Combo, core_checks_v3_combos

    combos = 0
    for cls in nodes.node_list():
        inputs = cls.INPUT_TYPES()
        if hasattr(_io, "get_finalized_class_inputs"):
            _io.get_finalized_class_inputs(inputs, {})
        for section in ("required", "optional"):
            for name, (io_type, *_rest) in inputs.get(section, {}).items():
                if isinstance(io_type, list) or io_type == "COMBO":
                    combos += 1
                    assert isinstance(io_type, str) == core_checks_v3_combos(), (cls.__name__, name, io_type)
    assert combos >= 4
    assert core_checks_v3_combos() == hasattr(_io, "get_finalized_class_inputs")
    assert Combo("x", options=["a", "b"]).get_io_type() == ("COMBO" if core_checks_v3_combos() else ["a", "b"])
