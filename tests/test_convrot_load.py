"""convrot_w4a4 / asym_w4a8_int8 files from the CLI (``--format NAME``): bit-exact with the codec, loaded and
run by the pack's ops on any ComfyUI (0.3.75 in CI: dequantize path), and by STOCK current ComfyUI's own
``mixed_precision_ops`` when ``HYBRIDQUANT_COMFYUI`` points at a tree whose ``QUANT_ALGOS`` has them."""

from __future__ import annotations

import json

import pytest
import torch
from convert_helpers import decode, rel_err, run_cli
from safetensors.torch import save_file

LAYERS = {"blocks.0.attn.qkv": (48, 256), "blocks.0.mlp.fc": (32, 512)}
FORMATS = [("convrot_w4a4", {}), ("asym_w4a8_int8", {}), ("int8_tensorwise", {})]


def _weights():
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, (o, i) in LAYERS.items():
        sd[f"{name}.weight"] = (torch.randn(o, i, generator=g) * 0.05).to(torch.bfloat16)
        sd[f"{name}.bias"] = (torch.randn(o, generator=g) * 0.01).to(torch.bfloat16)
    return sd


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    p = tmp_path_factory.mktemp("convrot") / "tiny.safetensors"
    w = _weights()
    save_file(w, str(p))
    return p, w


def _convert(src, tmp_path, fmt):
    path, w = src
    out = tmp_path / f"{fmt}.safetensors"
    run_cli("-i", path, "-o", out, "-q", "--simple", "--format", fmt)  # RTN: the oracle is the codec
    return out, w


@pytest.mark.parametrize("fmt,opts", FORMATS)
def test_cli_format_writes_the_codec_layout(src, tmp_path, fmt, opts):
    from hybridquant.converter.formats import get_codec

    out, w = _convert(src, tmp_path, fmt)
    infos, deq, _, tensors = decode(out)
    assert set(infos) == set(LAYERS)
    for layer in LAYERS:
        ref = get_codec(fmt).quantize(w[f"{layer}.weight"], **opts)
        for suffix, t in ref.items():
            got = tensors[f"{layer}.{suffix}"]
            same = torch.equal(got.view(torch.uint8), t.view(torch.uint8)) if t.element_size() == 1 else torch.equal(got, t)
            assert got.dtype == t.dtype and same, (layer, suffix)
        cq = json.loads(bytes(tensors[f"{layer}.comfy_quant"].tolist()))
        assert cq["format"] == fmt
        assert rel_err(deq[layer], w[f"{layer}.weight"]) < (0.02 if fmt.startswith("int8") else 0.2)


def test_cli_format_errors(src, tmp_path):
    path, _ = src
    p = run_cli("-i", path, "-o", tmp_path / "x.safetensors", "-q", "--format", "int3", check=False)
    assert p.returncode == 2 and "valid names:" in p.stderr and "convrot_w4a4" in p.stderr
    p = run_cli("-i", path, "-o", tmp_path / "y.safetensors", "-q", "--nvfp4", "--format", "convrot_w4a4", check=False)
    assert p.returncode == 2 and "conflicts" in p.stderr


class _Tiny(torch.nn.Module):
    def __init__(self, ops, **kw):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Module()])
        b = self.blocks[0]
        b.attn, b.mlp = torch.nn.Module(), torch.nn.Module()
        b.attn.qkv = ops.Linear(256, 48, **kw)
        b.mlp.fc = ops.Linear(512, 32, **kw)

    def forward(self, x256, x512):
        return self.blocks[0].attn.qkv(x256), self.blocks[0].mlp.fc(x512)


def _inputs():
    g = torch.Generator().manual_seed(4)
    return torch.randn(3, 256, generator=g).to(torch.bfloat16), torch.randn(3, 512, generator=g).to(torch.bfloat16)


def _reference(deq, w, x):
    return [torch.nn.functional.linear(xi.float(), deq[n].float(), w[f"{n}.bias"].float()) for n, xi in zip(LAYERS, x)]


@pytest.mark.parametrize("fmt", ["convrot_w4a4", "asym_w4a8_int8"])
def test_pack_ops_load_and_run(comfy, src, tmp_path, fmt):
    """The pack's ops on whatever ComfyUI the suite runs (0.3.75 in CI): weight-only dequantize path."""
    from safetensors.torch import load_file

    from hybridquant import ops

    out, w = _convert(src, tmp_path, fmt)
    sd = load_file(str(out))
    cls = ops.choose_ops(sd.keys(), None)
    m = _Tiny(cls, dtype=torch.bfloat16)
    m.load_state_dict(ops.prepare_state_dict(sd, None), strict=True)
    infos, deq, _, _ = decode(out)
    x = _inputs()
    with torch.no_grad():
        got = m(*x)
    for g, r in zip(got, _reference(deq, w, x)):
        assert rel_err(g.float(), r) < 0.02  # bf16 activations/output over the exact dequantized weight


@pytest.mark.parametrize("fmt", ["convrot_w4a4", "asym_w4a8_int8", "int8_tensorwise"])
def test_stock_current_comfyui_loads_and_runs(comfy, src, tmp_path, fmt):
    """Stock ComfyUI's own ops (no pack code) load our file natively and run it (its W4A4/W4A8 activation
    quantization included, hence the looser bound for the 4-bit formats)."""
    quant_ops = pytest.importorskip("comfy.quant_ops")
    if fmt not in getattr(quant_ops, "QUANT_ALGOS", {}):
        pytest.skip(f"this ComfyUI core has no native {fmt}")
    import comfy.ops
    from safetensors.torch import load_file

    out, w = _convert(src, tmp_path, fmt)
    sd = load_file(str(out))
    ops_cls = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.bfloat16)
    m = _Tiny(ops_cls, dtype=torch.bfloat16, device="cpu")
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    for layer in LAYERS:
        mod = m.get_submodule(layer)
        assert isinstance(mod.weight.data if hasattr(mod.weight, "data") else mod.weight, quant_ops.QuantizedTensor)
    infos, deq, _, _ = decode(out)
    x = _inputs()
    with torch.no_grad():
        got = m(*x)
    bound = 0.05 if fmt == "int8_tensorwise" else 0.35
    for g, r in zip(got, _reference(deq, w, x)):
        assert rel_err(g.float(), r) < bound


@pytest.mark.parametrize("fmt", ["convrot_w4a4", "asym_w4a8_int8"])
def test_layer_the_format_cannot_store_stays_plain(tmp_path, fmt):
    """``--format convrot_w4a4`` (or W4A8) on a model with layers narrower than the rotation group: those
    layers are copied in bf16 with the reason in the summary and the report; the others are written."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(5)
    sd = _weights()
    sd["blocks.0.narrow.weight"] = (torch.randn(64, 96, generator=g) * 0.05).to(torch.bfloat16)  # 96: not a multiple of 256
    src = tmp_path / "narrow.safetensors"
    save_file(sd, str(src))
    out, report = tmp_path / "out.safetensors", tmp_path / "report.json"
    p = run_cli("-i", src, "-o", out, "--simple", "--format", fmt, "--report", report)
    assert p.returncode == 0, p.stderr
    assert "kept in high precision, shape the format cannot store: 1 layer(s): blocks.0.narrow.weight" in p.stdout
    assert "in_features 96 must be a multiple of" in p.stdout
    written = load_file(str(out))
    assert torch.equal(written["blocks.0.narrow.weight"], sd["blocks.0.narrow.weight"])  # plain, bit for bit
    assert "blocks.0.narrow.comfy_quant" not in written
    infos, _, _, _ = decode(out)
    assert set(infos) == set(LAYERS)  # the layers it can store are quantized
    rec = {r["name"]: r for r in json.loads(report.read_text())["layers"]}["blocks.0.narrow.weight"]
    assert rec["format"] is None and rec["reason"].startswith("unstorable shape:")


@pytest.mark.parametrize("fmt", ["convrot_w4a4", "asym_w4a8_int8"])
def test_file_with_a_kept_narrow_layer_loads(comfy, tmp_path, fmt):
    """The file with the kept bf16 layer loads in the pack's ops (and in stock ComfyUI's own ops where the
    core has the format) and the narrow layer computes with its exact bf16 weight."""
    from safetensors.torch import load_file

    from hybridquant import ops

    g = torch.Generator().manual_seed(6)
    sd = _weights()
    sd["blocks.0.narrow.weight"] = (torch.randn(64, 96, generator=g) * 0.05).to(torch.bfloat16)
    src, out = tmp_path / "narrow.safetensors", tmp_path / "out.safetensors"
    save_file(sd, str(src))
    run_cli("-i", src, "-o", out, "-q", "--simple", "--format", fmt)
    written = load_file(str(out))
    x = torch.randn(3, 96, generator=g).to(torch.bfloat16)
    want = torch.nn.functional.linear(x, sd["blocks.0.narrow.weight"])
    variants = [("pack", ops.choose_ops(written.keys(), None), ops.prepare_state_dict(written, None))]
    quant_ops = __import__("importlib").import_module("comfy.quant_ops")
    if fmt in getattr(quant_ops, "QUANT_ALGOS", {}):
        import comfy.ops

        variants.append(("stock", comfy.ops.mixed_precision_ops({}, compute_dtype=torch.bfloat16), written))
    for who, cls, state in variants:
        m = _Tiny(cls, dtype=torch.bfloat16)
        m.blocks[0].narrow = cls.Linear(96, 64, bias=False, dtype=torch.bfloat16)
        missing, unexpected = m.load_state_dict(state, strict=False)
        assert not missing and not unexpected, (who, missing, unexpected)
        with torch.no_grad():
            got = m.blocks[0].narrow(x)
        assert torch.equal(got, want), who
