"""Low-rank branch, Hadamard rotation and the 5/6-bit formats (issue 14): files decode to the
definitions, and the ops (real ComfyUI 0.3.75 layer code) compute ``x @ decoded.T + bias``.

Definitions (``converter/transforms.py``): ``decoded = dequant(weight) · H + svd_up @ svd_down`` with H the
orthonormal Sylvester Hadamard matrix applied blockwise along the input dim.
"""

from __future__ import annotations

import math

import ops_helpers as H
import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridquant.converter import rotation
from hybridquant.converter.convert import convert_file
from hybridquant.converter.decode import decode_file
from hybridquant.converter.formats import get_codec
from hybridquant.converter.formats._intpack import pack_codes, unpack_codes
from hybridquant.converter.metadata import decode_comfy_quant
from hybridquant.converter.plan import PlanOptions

MODES = [("bnb4bit", {}), ("nvfp4", {}), ("int5", {}), ("int6", {}), ("fp8", {}), ("int8", {"scaling_mode": "row"})]
TRANSFORMS = [{"svd_rank": 8}, {"rotate": "hadamard"}, {"svd_rank": 8, "rotate": "hadamard:16"}]


def _blockdiag_hadamard(n: int, b: int) -> torch.Tensor:
    """The dense [n, n] matrix of the blockwise rotation, built independently of ``rotation.rotate``."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*([h / math.sqrt(b)] * (n // b)))


def test_hadamard_orthonormal_and_default_block():
    for b in (2, 16, 256):
        h = rotation.hadamard(b, dtype=torch.float64)
        torch.testing.assert_close(h @ h.T, torch.eye(b, dtype=torch.float64))
    assert rotation.default_block(3072) == 256 and rotation.default_block(80) == 16 and rotation.default_block(7) == 1
    with pytest.raises(ValueError, match="hadamard"):
        rotation.parse("givens")


@pytest.mark.parametrize("bits", [5, 6])
def test_intpack_roundtrip(bits):
    u = torch.randint(0, 1 << bits, (7, 64), dtype=torch.uint8)
    p = pack_codes(u, bits)
    assert p.shape == (7, 64 * bits // 8)
    assert torch.equal(unpack_codes(p, bits), u)


@pytest.mark.parametrize("name", ["int5_groupwise", "int6_groupwise"])
def test_int_groupwise_decodes_to_grid_definition(name):
    c = get_codec(name)
    w = torch.randn(33, 100) * 0.1
    w[3, 5] = 4.0  # an outlier in one group only
    t = c.quantize(w, group_size=32)
    p = c.scale_params(w, group_size=32)
    s = c.element_scale(p, (33, 100), group_size=32)
    ref = c.round_to_grid(w / s) * s
    assert torch.equal(c.dequantize(t, (33, 100), group_size=32), ref)
    assert (w - ref).abs().max() <= s.max() / 2 + 1e-7


def _file(tmp_path):
    sd = H.float_weights()
    src = tmp_path / "in.safetensors"
    save_file({k: v.to(torch.bfloat16) if k.endswith("weight") else v for k, v in sd.items()}, str(src))
    return src


def _definition(sd, layer, shape):
    """decoded = dequant(weight) · H + up @ down, from the file's own tensors and .comfy_quant."""
    from hybridquant.converter import metadata as qmeta

    infos = qmeta.discover_layers(list(sd), None, sd.__getitem__)
    info = infos[layer]
    tensors = qmeta.load_layer_tensors(info, sd.__getitem__)
    opts = {k: v for k, v in info.options.items() if k != "dtype"}
    w = get_codec(info.format).dequantize(tensors, shape, torch.float32, **opts).double()
    cq = decode_comfy_quant(sd[f"{layer}.comfy_quant"], layer)
    if "rotation" in cq:
        w = w @ _blockdiag_hadamard(shape[1], cq["rotation"]["block"])
    if "svd_rank" in cq:
        w = w + sd[f"{layer}.svd_up"].double() @ sd[f"{layer}.svd_down"].double()
    return w.float(), cq


@pytest.mark.parametrize("mode,kw", MODES)
@pytest.mark.parametrize("tf", TRANSFORMS)
def test_file_decodes_to_definition(tmp_path, mode, kw, tf):
    src = _file(tmp_path)
    out = tmp_path / "out.safetensors"
    convert_file(src, out, PlanOptions(mode=mode, **kw, **tf))
    sd = load_file(str(out))
    dec = decode_file(out)
    orig = load_file(str(src))
    for name, i, o, _ in H.DIMS:
        ref, cq = _definition(sd, name, (o, i))
        torch.testing.assert_close(dec[name], ref, rtol=1e-5, atol=1e-6)
        if "svd_rank" in tf and min(o, i) >= 16:
            assert cq["svd_rank"] == 8 and sd[f"{name}.svd_up"].shape == (o, 8) and sd[f"{name}.svd_down"].dtype == torch.bfloat16
        if "rotate" in tf:
            assert cq["rotation"]["kind"] == "hadamard"
            want = 16 if tf["rotate"].endswith(":16") and i % 16 == 0 else rotation.default_block(i)
            assert cq["rotation"]["block"] == want  # a block that does not divide in_features: the default
        w = orig[f"{name}.weight"].float()
        assert float((dec[name] - w).norm() / w.norm()) < 0.15  # a real quantization of this weight


def test_svd_branch_lowers_error(tmp_path):
    src = _file(tmp_path)
    errs = {}
    for tf in ({}, {"svd_rank": 8}):
        out = tmp_path / f"o{len(tf)}.safetensors"
        convert_file(src, out, PlanOptions(mode="bnb4bit", method="rtn", **tf))
        dec, orig = decode_file(out), load_file(str(src))
        errs[len(tf)] = sum(float((dec[n] - orig[f"{n}.weight"].float()).norm()) for n in dec)
    assert errs[1] < 0.9 * errs[0]


@pytest.mark.comfyui
@pytest.mark.parametrize("mode,kw", MODES)
@pytest.mark.parametrize("tf", TRANSFORMS)
def test_ops_output_is_x_decoded(ops, tmp_path, mode, kw, tf):
    src = _file(tmp_path)
    out = tmp_path / "out.safetensors"
    convert_file(src, out, PlanOptions(mode=mode, **kw, **tf))
    sd = load_file(str(out))
    dec = decode_file(out)
    m = H.load_ours(sd)
    x = H.inputs()
    for name, i, o, bias in H.DIMS:
        layer = getattr(m, name)
        xi = torch.randn(5, i, generator=torch.Generator().manual_seed(3))
        want = xi @ dec[name].T + (sd[f"{name}.bias"] if bias else 0)
        torch.testing.assert_close(layer(xi), want, rtol=1e-5, atol=1e-5)
    m(x)  # the whole model runs
    # state_dict() writes the file's tensors back, branch and .comfy_quant included
    out_sd = m.state_dict()
    for k in sd:
        assert k in out_sd, k


def test_target_size_meets_budget_and_config_reproduces(tmp_path):
    import os

    from hybridquant.converter import budget

    g = torch.Generator().manual_seed(0)
    src = tmp_path / "m.safetensors"
    save_file({f"l{i}.weight": (torch.randn(128, 256, generator=g) * (1 + i)).to(torch.bfloat16) for i in range(12)},
              str(src))
    uniform = tmp_path / "nf4.safetensors"
    convert_file(src, uniform, PlanOptions(mode="bnb4bit", method="rtn"))
    target = int(os.path.getsize(uniform) * 1.25)
    cfg, text = budget.budget_config(src, PlanOptions(mode="bnb4bit", method="rtn"), target_size=target)
    assert "size-budget plan" in text
    out = tmp_path / "b.safetensors"
    convert_file(src, out, PlanOptions(mode="bnb4bit", method="rtn", layer_config=cfg))
    size = os.path.getsize(out)
    assert 0.99 * target <= size <= target
    again = tmp_path / "b2.safetensors"
    budget.write_config(cfg, tmp_path / "cfg.json")
    convert_file(src, again, PlanOptions(mode="bnb4bit", method="rtn", layer_config=str(tmp_path / "cfg.json")))
    assert open(out, "rb").read() == open(again, "rb").read()
    # a budget below every layer's smallest choice is a clear error
    with pytest.raises(Exception, match="budget too small"):
        budget.budget_config(src, PlanOptions(mode="bnb4bit"), target_size=1000)


def test_parse_size():
    from hybridquant.converter.budget import parse_size

    assert parse_size("900MB") == 900 * 10 ** 6 and parse_size("6.5GB") == 6_500_000_000
    assert parse_size("2GiB") == 2 * 2 ** 30 and parse_size("12345") == 12345
    with pytest.raises(Exception, match="target-size"):
        parse_size("big")


@pytest.mark.comfyui
def test_node_settings_translate_budget_and_transforms(comfy):
    from hybridquant.nodes import quantize_options as qo

    def build(**kw):
        return qo.build_options(qo.settings_from_inputs(kw))

    o = build(format="bnb_nf4", target_size="6.5GB", svd_rank=32, rotate="hadamard:128")
    assert o.target_size == 6_500_000_000 and o.svd_rank == 32 and o.rotate == "hadamard:128"
    assert build(format="nvfp4", target_size="5.5bpw").target_bpw == 5.5
    with pytest.raises(ValueError, match="target_size"):
        build(format="nvfp4", target_size="lots")
    with pytest.raises(ValueError, match="rotate"):
        build(format="nvfp4", rotate="givens")


@pytest.mark.comfyui
@pytest.mark.parametrize("mode,kw", [("bnb4bit", {}), ("nvfp4", {}), ("int8", {"scaling_mode": "row"}), ("int5", {})])
def test_ops_patch_on_transformed_layer(ops, tmp_path, mode, kw):
    """A weight patch (LoRA / low-VRAM function) applies to the FULL decoded weight: 4-bit layers compute
    ``x @ (decoded + delta).T``; 8-bit ones the fixed-scale requantization of it (branch and rotation kept)."""
    src = _file(tmp_path)
    out = tmp_path / "out.safetensors"
    convert_file(src, out, PlanOptions(mode=mode, **kw, svd_rank=8, rotate="hadamard"))
    sd = load_file(str(out))
    dec = decode_file(out)
    m = H.load_ours(sd)
    layer = m.a
    delta = torch.randn(96, 80, generator=torch.Generator().manual_seed(5)) * 0.01
    layer.weight_function = [lambda w: w + delta.to(w.dtype)]
    x = torch.randn(5, 80, generator=torch.Generator().manual_seed(3))
    want = x @ (dec["a"] + delta).T + sd["a.bias"]
    got = layer(x)
    if ops.dispatch.is_four_bit(layer.hq_format):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # requantized with the stored scales: within the format's rounding of the patched weight
        assert float((got - want).norm() / want.norm()) < 0.05
        assert float((got - want).norm()) < float((x @ delta.T).norm())  # the patch is really applied


def test_budget_menu_from_registry_with_transforms():
    from hybridquant.converter import budget
    from hybridquant.converter.formats import registry

    steps = {(s.name, tuple(sorted(o.items()))) for s in registry.specs() for o in s.budget_steps}
    plain = budget.menu()
    assert {(n, tuple(sorted(o.items()))) for _, _, n, o, _ in plain if n} == steps
    assert {n for _, _, n, _, _ in plain} >= {None, "int8_tensorwise", "int6_groupwise", "int5_groupwise",
                                               "bnb_nf4", "nvfp4"}
    rot = {"kind": "hadamard", "block": None}
    both = budget.menu({"svd_rank": 8, "rotation": rot})
    four = [x for x in both if x[2] and registry.get_spec(x[2]).four_bit]
    # every 4-bit step: plain, + svd, + rotation, + both; every entry says its transforms explicitly
    assert len(four) == 4 * sum(len(s.budget_steps) for s in registry.specs() if s.four_bit)
    assert all("svd_rank" in e and "rotate" in e for _, e, n, _, _ in both if n)
    assert any(e["svd_rank"] == 8 and e["rotate"] == "hadamard" for _, e, _, _, _ in four)


def test_budget_chooses_transform_candidates_per_layer(tmp_path):
    from hybridquant.converter import budget

    g = torch.Generator().manual_seed(0)
    # a low-rank-dominated layer (the branch pays) and a plain Gaussian one
    lr = (torch.randn(256, 4, generator=g) @ torch.randn(4, 256, generator=g)) * 3 + torch.randn(256, 256, generator=g) * 0.05
    src = tmp_path / "m.safetensors"
    save_file({"a.weight": lr.to(torch.bfloat16), "b.weight": torch.randn(256, 256, generator=g).to(torch.bfloat16)},
              str(src))
    opts = PlanOptions(mode="bnb4bit", method="rtn", svd_rank=4)
    choice, _, _, _ = budget.budget_choice(src, opts, target_bpw=5.0)
    assert "svd4" in choice["a"].label, {k: c.label for k, c in choice.items()}
    cfg, _ = budget.budget_config(src, opts, target_bpw=5.0)
    out = tmp_path / "o.safetensors"
    convert_file(src, out, PlanOptions(mode="bnb4bit", method="rtn", svd_rank=4, layer_config=cfg))
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    # the budget's choice is what the file holds: a branch on "a" only where it chose one
    assert "a.svd_up" in keys
    assert ("b.svd_up" in keys) == ("svd4" in choice["b"].label)
