"""Every primary mode through the real CLI on a small Flux-like file; outputs decoded and checked.

For round-to-nearest (``--simple``) the stored tensors must equal the codec's own ``quantize`` of the
input weight bit for bit, the decoded weight must be within the format's error bound, the untouched
tensors must be copied byte for byte, and the header must keep the input's ``modelspec.*`` metadata.
"""

from __future__ import annotations

import json

import pytest
import torch
from convert_helpers import decode, header_layers, rel_err, run_cli, write_checkpoint

# (flags, expected format name, codec options for the direct oracle call, max relative error)
MODES = [
    # bounds: measured errors of this input (heavy outliers hurt tensorwise scales) plus ~20 % margin
    ([], "float8_e4m3fn", {}, 0.04),
    (["--scaling_mode", "row"], "float8_e4m3fn_rowwise", {}, 0.04),
    (["--scaling-mode", "block", "--block-size", "32"], "float8_e4m3fn_blockwise", {"group_size": 32}, 0.04),
    (["--int8"], "int8_tensorwise", {}, 0.16),
    (["--int8", "--scaling_mode", "row"], "int8_tensorwise", {"per_row": True}, 0.12),
    (["--int8", "--scaling_mode", "block", "--block_size", "64"], "int8_blockwise", {"group_size": 64}, 0.12),
    (["--mxfp8"], "mxfp8", {}, 0.04),
    (["--nvfp4"], "nvfp4", {}, 0.13),
    (["--bnb-4bit"], "bnb_nf4", {"blocksize": 64}, 0.17),
    (["--bnb_4bit", "--bnb-quant-type", "fp4", "--bnb-blocksize", "128", "--bnb-double-quant"], "bnb_fp4",
     {"blocksize": 128, "double_quant": True}, 0.3),
]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    return p, write_checkpoint(p)


@pytest.mark.parametrize("flags,fmt,opts,bound", MODES, ids=[m[1] + ("_" + "_".join(m[0]) if m[0] else "") for m in MODES])
def test_mode_roundtrip(src, tmp_path, flags, fmt, opts, bound):
    from hybridquant.converter.formats import get_codec

    path, weights = src
    out = tmp_path / "out.safetensors"
    proc = run_cli("-i", path, "-o", out, "--simple", "-q", "--report", tmp_path / "r.json", *flags)
    assert "layers per format" in proc.stdout and fmt in proc.stdout
    infos, deq, md, tensors = decode(out)
    report = {r["name"]: r["rel_error"] for r in json.loads((tmp_path / "r.json").read_text())["layers"] if r["format"]}
    from hybridquant.converter.detection import detection_read

    codec = get_codec(fmt)
    quantized = {n[: -len(".weight")] for n, t in weights.items() if n.endswith(".weight") and t.ndim == 2}
    # layers ComfyUI's detection reads stay unquantized where this format would change their stored shape
    kept = {n for n in quantized if detection_read(n)
            and tuple(codec.output_specs(tuple(weights[f"{n}.weight"].shape), **opts)["weight"].shape)
            != tuple(weights[f"{n}.weight"].shape)}
    assert set(infos) == quantized - kept
    for n in kept:
        assert torch.equal(tensors[f"{n}.weight"], weights[f"{n}.weight"]), n
    for layer, info in infos.items():
        w = weights[f"{layer}.weight"]
        assert info.format == fmt
        err = rel_err(deq[layer], w)
        assert err < bound, (layer, err)
        assert abs(report[f"{layer}.weight"] - err) < 1e-3 * max(err, 1e-3), layer  # report agrees
        # bit-exact against the codec called directly (RTN)
        ref = codec.quantize(w, **opts, **({"dtype": "bfloat16"} if fmt.startswith("bnb") else {}))
        for suffix, t in ref.items():
            got = tensors[f"{layer}.{suffix}"]
            assert got.dtype == t.dtype and got.shape == t.shape, (layer, suffix)
            assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got,
                               t.view(torch.uint8) if t.element_size() == 1 else t), (layer, suffix)
    # untouched tensors copied byte for byte
    for n, t in weights.items():
        if t.ndim != 2:
            assert torch.equal(tensors[n], t), n
    assert md["modelspec.title"] == "tiny flux-like"
    if fmt.startswith("bnb"):
        assert not any(k.endswith(".comfy_quant") for k in tensors)
        assert header_layers(md) == {}
    else:
        hl = header_layers(md)
        assert set(hl) == quantized - kept
        for layer in quantized - kept:
            cq = json.loads(bytes(tensors[f"{layer}.comfy_quant"].tolist()))
            assert cq == hl[layer] and cq["format"] == fmt
        if fmt in ("mxfp8", "nvfp4"):
            assert hl["double_blocks.0.txt_mod.lin"]["orig_shape"] == [96, 72]


def test_bnb_output_loads_in_bitsandbytes(src, tmp_path):
    """The BNB layers we write are accepted by bitsandbytes itself (QuantState.from_dict + dequantize_4bit)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    path, weights = src
    out = tmp_path / "bnb.safetensors"
    run_cli("-i", path, "-o", out, "--simple", "-q", "--bnb-4bit", "--bnb-double-quant")
    _, _, _, tensors = decode(out)
    layer = "double_blocks.0.img_mlp.0"
    qs = {k[len(layer) + len(".weight."):]: v for k, v in tensors.items() if k.startswith(f"{layer}.weight.")}
    state = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
    w = bnbf.dequantize_4bit(tensors[f"{layer}.weight"], state)
    assert w.shape == weights[f"{layer}.weight"].shape and w.dtype == torch.bfloat16
    assert rel_err(w, weights[f"{layer}.weight"]) < 0.17


def test_default_method_not_worse_than_rtn(src, tmp_path):
    """Without --simple the default rounding method runs; its per-layer error is <= RTN's (report JSON)."""
    path, _ = src
    rep_d, rep_s = tmp_path / "d.json", tmp_path / "s.json"
    run_cli("-i", path, "-o", tmp_path / "d.safetensors", "-q", "--int8", "--report", rep_d)
    run_cli("-i", path, "-o", tmp_path / "s.safetensors", "-q", "--int8", "--simple", "--report", rep_s)
    d, s = json.loads(rep_d.read_text()), json.loads(rep_s.read_text())
    ed = {r["name"]: r for r in d["layers"] if r["format"]}
    es = {r["name"]: r for r in s["layers"] if r["format"]}
    assert set(ed) == set(es) and ed
    for n in ed:
        assert es[n]["method"] == "rtn"
        assert ed[n]["rel_error"] <= es[n]["rel_error"] * (1 + 1e-5), n


def test_help_lists_every_family():
    """``--help`` prints (the format summaries hold "%", which argparse formats) and names every
    family's flag and every format's label; ``--help-filters`` prints too."""
    from hybridquant.converter.formats import registry

    proc = run_cli("--help", subprocess_=True)  # raises unless it exits 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for spec in registry.specs():
        if spec.variants:
            assert spec.label in text, spec.label
    assert "--bnb-quant-type {nf4,fp4}" in text
    assert run_cli("--help-filters", subprocess_=True).stdout.strip()
