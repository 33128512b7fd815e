"""``--make-hybrid-mxfp8`` [``--tensor-scales``]: MXFP8 file -> Hybrid MXFP8 file.

Inputs are built with the real codecs (and one layer with comfy-kitchen's own MXFP8 quantizer) and
written with the ``safetensors`` package; outputs are read back with ``safe_open`` and decoded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging

import convert_helpers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hybridquant.converter.errors import InputFileError, LayerError, NoMatchingLayersError, OutputFileError
from hybridquant.converter.formats import get_codec
from hybridquant.converter.hybridize import make_hybrid_mxfp8
from hybridquant.converter.metadata import discover_layers, load_layer_tensors, validate_layer

QM = "_quantization_metadata"
# layer -> logical shape; one with padding on both axes, one whose metadata omits orig_shape
MX_LAYERS = {
    "double_blocks.0.img_attn.qkv": (48, 80),
    "double_blocks.0.img_mlp.0": (64, 96),
    "single_blocks.0.linear1": (40, 64),
}
NO_ORIG_SHAPE = "double_blocks.0.img_mlp.0"
FP8_LAYER = "final_layer.linear"  # a non-MXFP8 quantized layer that must pass through untouched


def cq(cfg: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(cfg, separators=(",", ":")).encode()), dtype=torch.uint8)


def weights(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (layer, shape) in enumerate(MX_LAYERS.items()):
        w = torch.randn(shape, generator=g) * (0.02 * 4 ** i)
        w[0, :5] *= 40  # outliers: block scales differ across the tensor
        out[layer] = w.to(torch.bfloat16)
    out[FP8_LAYER] = (torch.randn(32, 64, generator=g) * 0.1).to(torch.bfloat16)
    return out


def build_mxfp8(path, *, tensors_cq=True, header=True, seed=0):
    ws = weights(seed)
    tensors, layers = {}, {}
    mx = get_codec("mxfp8")
    for layer, shape in MX_LAYERS.items():
        for s, t in mx.quantize(ws[layer]).items():
            tensors[f"{layer}.{s}"] = t
        tensors[f"{layer}.bias"] = torch.zeros(shape[0], dtype=torch.bfloat16) + 0.5
        cfg = {"format": "mxfp8", "orig_dtype": "bfloat16"}
        if layer != NO_ORIG_SHAPE:
            cfg["orig_shape"] = list(shape)
        layers[layer] = cfg
    for s, t in get_codec("float8_e4m3fn").quantize(ws[FP8_LAYER]).items():
        tensors[f"{FP8_LAYER}.{s}"] = t
    layers[FP8_LAYER] = {"format": "float8_e4m3fn"}
    tensors["img_in.weight"] = torch.randn(16, 8).to(torch.bfloat16)
    if tensors_cq:
        for layer, cfg in layers.items():
            tensors[f"{layer}.comfy_quant"] = cq(cfg)
    meta = {"modelspec.title": "tiny flux-like"}
    if header:
        meta[QM] = json.dumps({"format_version": "1.0", "layers": layers})
    save_file(tensors, str(path), metadata=meta)
    return ws, layers


def build_fp8(path, *, prefix="", skip=(), legacy=False, seed=0):
    """A tensorwise FP8 file of the same weights (the --tensor-scales source)."""
    ws = weights(seed)
    tensors, layers = {}, {}
    for layer, w in ws.items():
        if layer in skip:
            continue
        q = get_codec("float8_e4m3fn").quantize(w)
        name = prefix + layer
        tensors[f"{name}.weight"] = q["weight"]
        tensors[f"{name}.{'scale_weight' if legacy else 'weight_scale'}"] = q["weight_scale"]
        if not legacy:
            tensors[f"{name}.comfy_quant"] = cq({"format": "float8_e4m3fn"})
        layers[layer] = q["weight_scale"]
    if legacy:
        tensors[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(tensors, str(path))
    return layers


def raw(path) -> dict[str, bytes]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).reshape(-1).view(torch.uint8).numpy().tobytes() + str(f.get_tensor(k).dtype).encode()
                for k in f.keys()}


def load(path):
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    return tensors, meta


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def max_block_scale(weight_scale: torch.Tensor) -> float:
    """Largest decoded E8M0 block scale, straight from the stored bytes (code c -> 2^(c-127), 0 -> 0)."""
    codes = weight_scale.reshape(-1).view(torch.uint8).to(torch.int64)
    return 2.0 ** (int(codes.max()) - 127)


@pytest.fixture
def mxfile(tmp_path):
    p = tmp_path / "model_mxfp8.safetensors"
    ws, layers = build_mxfp8(p)
    return p, ws, layers


def check_hybrid_output(src, out, layers_cfg, *, header=True, tensors_cq=True):
    a, b = raw(src), raw(out)
    t_out, meta = load(out)
    assert set(b) == set(a) | {f"{L}.weight_scalar" for L in MX_LAYERS}
    for k in a:
        if k.endswith(".comfy_quant") and k[: -len(".comfy_quant")] in MX_LAYERS:
            continue
        assert a[k] == b[k], f"{k} changed"
    hy, mx = get_codec("hybrid_mxfp8"), get_codec("mxfp8")
    t_in, meta_in = load(src)
    for L, shape in MX_LAYERS.items():
        s = t_out[f"{L}.weight_scalar"]
        assert s.dtype == torch.float32 and s.shape == ()
        want = dict(layers_cfg[L], format="hybrid_mxfp8")
        if tensors_cq:
            assert json.loads(bytes(t_out[f"{L}.comfy_quant"].tolist())) == want
        if header:
            assert json.loads(meta[QM])["layers"][L] == want
        # The MXFP8 part decodes exactly as the input did.
        ins = {k: t_in[f"{L}.{k}"] for k in ("weight", "weight_scale")}
        outs = {k: t_out[f"{L}.{k}"] for k in ("weight", "weight_scale", "weight_scalar")}
        assert torch.equal(hy.dequantize(outs, shape), mx.dequantize(ins, shape))
    assert meta["modelspec.title"] == "tiny flux-like"
    # The loaders' view (metadata.py): every converted layer is discovered as hybrid_mxfp8 and validates.
    infos = discover_layers(list(t_out), meta, t_out.__getitem__)
    for L, shape in MX_LAYERS.items():
        assert infos[L].format == "hybrid_mxfp8"
        validate_layer(infos[L], load_layer_tensors(infos[L], t_out.__getitem__), shape)
    assert infos[FP8_LAYER].format == "float8_e4m3fn"
    if header:
        assert json.loads(meta[QM])["layers"][FP8_LAYER] == {"format": "float8_e4m3fn"}
    if tensors_cq:
        assert json.loads(bytes(t_out[f"{FP8_LAYER}.comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}
    return t_out


def test_computed_scalar_is_largest_block_scale(mxfile, tmp_path):
    p, ws, layers = mxfile
    before = sha(p)
    out = tmp_path / "hybrid.safetensors"
    rep = make_hybrid_mxfp8(p, out)
    t = check_hybrid_output(p, out, layers)
    for L in MX_LAYERS:
        assert float(t[f"{L}.weight_scalar"]) == max_block_scale(t[f"{L}.weight_scale"])
        assert rep["scalars"][L] == float(t[f"{L}.weight_scalar"])
    assert rep["layers_converted"] == 3 and rep["scalar_sources"] == {"imported": 0, "computed": 3}
    assert rep["warnings"] == [] and rep["layers_already_hybrid"] == 0
    assert sha(p) == before


def test_tensor_scales_imported_exactly(mxfile, tmp_path):
    p, ws, layers = mxfile
    fp8 = tmp_path / "model_fp8.safetensors"
    scales = build_fp8(fp8)
    out = tmp_path / "hybrid.safetensors"
    rep = make_hybrid_mxfp8(p, out, tensor_scales=fp8)
    t = check_hybrid_output(p, out, layers)
    for L in MX_LAYERS:
        assert torch.equal(t[f"{L}.weight_scalar"], scales[L].to(torch.float32).reshape(()))
        # Different from the block-scale derivation, so the import really happened.
        assert float(t[f"{L}.weight_scalar"]) != max_block_scale(t[f"{L}.weight_scale"])
    assert rep["scalar_sources"] == {"imported": 3, "computed": 0} and rep["warnings"] == []


@pytest.mark.parametrize("how", ["computed", "tensor_scales"])
def test_tensorwise_reexpression_close_to_weight(mxfile, tmp_path, how):
    """The tensorwise FP8 view of the hybrid layer (what Ada/Hopper run) stays close to the weight."""
    from hybridquant.converter.formats.hybrid_mxfp8 import to_tensorwise_fp8

    p, ws, layers = mxfile
    out = tmp_path / "hybrid.safetensors"
    if how == "tensor_scales":
        fp8 = tmp_path / "fp8.safetensors"
        build_fp8(fp8)
        make_hybrid_mxfp8(p, out, tensor_scales=fp8)
    else:
        make_hybrid_mxfp8(p, out)
    t, _ = load(out)
    mx = get_codec("mxfp8")
    for L, shape in MX_LAYERS.items():
        tensors = {k: t[f"{L}.{k}"] for k in ("weight", "weight_scale", "weight_scalar")}
        q, scale = to_tensorwise_fp8(tensors, shape)
        assert q.dtype == torch.float8_e4m3fn and tuple(q.shape) == shape and scale.shape == ()
        deq = q[: shape[0], : shape[1]].float() * scale.float()
        w = ws[L].float()
        rel = float((deq - w).norm() / w.norm())
        rel_mx = float((mx.dequantize(tensors, shape) - w).norm() / w.norm())
        # Naively multiplying the raw codes by the scalar is off by 8-19x here; the re-expression is
        # as good as MXFP8 itself for the power-of-two scalar, and within 2x of it for an imported one.
        assert rel < 2 * rel_mx, (L, rel, rel_mx)
        if how == "computed":
            assert abs(rel - rel_mx) < 1e-3, (L, rel, rel_mx)


def test_tensor_scales_with_prefix_and_legacy_names(mxfile, tmp_path):
    p, ws, layers = mxfile
    fp8 = tmp_path / "legacy.safetensors"
    scales = build_fp8(fp8, prefix="model.diffusion_model.", legacy=True)
    out = tmp_path / "hybrid.safetensors"
    rep = make_hybrid_mxfp8(p, out, tensor_scales=fp8)
    t = check_hybrid_output(p, out, layers)
    for L in MX_LAYERS:
        assert float(t[f"{L}.weight_scalar"]) == float(scales[L])
    assert rep["scalar_sources"]["imported"] == 3


def test_partial_tensor_scales_falls_back_with_warning(mxfile, tmp_path, caplog):
    p, ws, layers = mxfile
    missing = "single_blocks.0.linear1"
    fp8 = tmp_path / "fp8.safetensors"
    scales = build_fp8(fp8, skip=(missing,))
    out = tmp_path / "hybrid.safetensors"
    with caplog.at_level(logging.WARNING, logger="hybridquant"):
        rep = make_hybrid_mxfp8(p, out, tensor_scales=fp8)
    t = check_hybrid_output(p, out, layers)
    assert rep["computed_layers"] == [missing]
    assert rep["scalar_sources"] == {"imported": 2, "computed": 1}
    assert len(rep["warnings"]) == 1 and missing in rep["warnings"][0]
    assert missing in caplog.text
    assert float(t[f"{missing}.weight_scalar"]) == max_block_scale(t[f"{missing}.weight_scale"])
    for L in set(MX_LAYERS) - {missing}:
        assert float(t[f"{L}.weight_scalar"]) == float(scales[L])
    with pytest.raises(NoMatchingLayersError, match=f"no usable scale for 1 of 3.*{missing}"):
        make_hybrid_mxfp8(p, tmp_path / "strict.safetensors", tensor_scales=fp8, strict_scales=True)
    assert not (tmp_path / "strict.safetensors").exists()


def test_tensor_scales_without_matching_layers(mxfile, tmp_path):
    p, _, _ = mxfile
    fp8 = tmp_path / "other.safetensors"
    build_fp8(fp8, prefix="text_encoders.t5xxl.transformer.", skip=tuple(MX_LAYERS))  # only FP8_LAYER, renamed
    out = tmp_path / "hybrid.safetensors"
    with pytest.raises(NoMatchingLayersError, match=r"--tensor-scales .*none of the 3 MXFP8 layers"):
        make_hybrid_mxfp8(p, out, tensor_scales=fp8)
    assert not out.exists()


def test_rowwise_scales_are_not_tensorwise(mxfile, tmp_path):
    p, ws, _ = mxfile
    fp8 = tmp_path / "rowwise.safetensors"
    tensors = {}
    for L in MX_LAYERS:
        q = get_codec("float8_e4m3fn_rowwise").quantize(ws[L])
        tensors.update({f"{L}.weight": q["weight"], f"{L}.weight_scale": q["weight_scale"],
                        f"{L}.comfy_quant": cq({"format": "float8_e4m3fn_rowwise"})})
    save_file(tensors, str(fp8))
    with pytest.raises(NoMatchingLayersError, match="not one tensorwise scale"):
        make_hybrid_mxfp8(p, tmp_path / "o.safetensors", tensor_scales=fp8)


@pytest.mark.parametrize("shape, bad_scale, match", [
    ((48, 96), False, r"double_blocks\.0\.img_attn\.qkv.*\[48, 96\].*another model"),  # scales of another model
    ((48, 80), True, r"weight_scale = nan.*finite and positive"),
], ids=["another_model", "nan_scale"])
def test_unusable_tensor_scale_refused(mxfile, tmp_path, shape, bad_scale, match):
    p, _, _ = mxfile
    L = "double_blocks.0.img_attn.qkv"
    fp8 = tmp_path / "scales.safetensors"
    q = get_codec("float8_e4m3fn").quantize(torch.randn(*shape))
    scale = torch.tensor(float("nan")) if bad_scale else q["weight_scale"]
    save_file({f"{L}.weight": q["weight"], f"{L}.weight_scale": scale}, str(fp8))
    with pytest.raises(LayerError, match=match):
        make_hybrid_mxfp8(p, tmp_path / "o.safetensors", tensor_scales=fp8)


def test_header_only_and_tensor_only_files(tmp_path):
    for kw in ({"tensors_cq": False}, {"header": False}):
        p = tmp_path / f"in_{'h' if 'tensors_cq' in kw else 't'}.safetensors"
        _, layers = build_mxfp8(p, **kw)
        out = tmp_path / f"out_{p.name}"
        make_hybrid_mxfp8(p, out)
        check_hybrid_output(p, out, layers, **kw)
        t, meta = load(out)
        if "header" in kw:
            assert QM not in meta
        else:
            assert not any(k.endswith(".comfy_quant") for k in t)


def test_comfy_kitchen_written_layer(tmp_path):
    """A layer quantized by comfy-kitchen (what ComfyUI's own tools write) is converted too."""
    ck = pytest.importorskip("comfy_kitchen")
    w = (torch.randn(64, 96) * 0.05).to(torch.bfloat16)
    q, s = ck.quantize_mxfp8(w, pad_32x=True)
    s = s.view(torch.uint8) if s.dtype != torch.uint8 else s
    p = tmp_path / "ck.safetensors"
    save_file({"blk.weight": q, "blk.weight_scale": s.contiguous(), "blk.comfy_quant": cq({"format": "mxfp8"})}, str(p))
    out = tmp_path / "ck_hybrid.safetensors"
    make_hybrid_mxfp8(p, out)
    t, _ = load(out)
    assert float(t["blk.weight_scalar"]) == max_block_scale(s)
    ref = ck.dequantize_mxfp8(q, s.view(torch.float8_e8m0fnu) if hasattr(torch, "float8_e8m0fnu") else s, torch.float32)
    got = get_codec("hybrid_mxfp8").dequantize({k: t[f"blk.{k}"] for k in ("weight", "weight_scale", "weight_scalar")}, (64, 96))
    assert torch.equal(got, ref[:64, :96])


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def test_no_mxfp8_layers(tmp_path):
    p = tmp_path / "fp8.safetensors"
    build_fp8(p)
    with pytest.raises(NoMatchingLayersError, match="no MXFP8 layers.*float8_e4m3fn"):
        make_hybrid_mxfp8(p, tmp_path / "o.safetensors")


def test_already_hybrid_file(mxfile, tmp_path):
    p, _, _ = mxfile
    h = tmp_path / "h.safetensors"
    make_hybrid_mxfp8(p, h)
    with pytest.raises(NoMatchingLayersError, match="3 layers are already hybrid_mxfp8"):
        make_hybrid_mxfp8(h, tmp_path / "hh.safetensors")


def test_broken_mxfp8_layer_named(tmp_path):
    p = tmp_path / "broken.safetensors"
    q = get_codec("mxfp8").quantize(torch.randn(64, 64))
    save_file({"x.weight": q["weight"], "x.weight_scale": q["weight_scale"][:64].contiguous(),
               "x.comfy_quant": cq({"format": "mxfp8"})}, str(p))
    with pytest.raises(LayerError, match=r"x\.weight_scale: expected blocked E8M0 scales"):
        make_hybrid_mxfp8(p, tmp_path / "o.safetensors")


def test_sigkill_mid_write_leaves_no_output(mxfile, tmp_path):
    """SIGKILL while the hybrid file is half written: the target never appears, the input is intact,
    and the next run removes the dead process's temp file."""
    import os
    import subprocess
    import sys

    p, _, _ = mxfile
    before = sha(p)
    out = tmp_path / "hybrid.safetensors"
    script = (
        "import os, signal, sys\n"
        "from hybridquant.converter.hybridize import make_hybrid_mxfp8\n"
        "def progress(done, total, name):\n"
        "    if done < total and name.endswith('.weight_scalar'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "make_hybrid_mxfp8(sys.argv[1], sys.argv[2], progress=progress)\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(p), str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert not out.exists()
    assert [f for f in os.listdir(tmp_path) if "partial" in f], "the killed writer's temp file should be left behind"
    assert sha(p) == before
    make_hybrid_mxfp8(p, out)
    assert out.exists() and [f for f in os.listdir(tmp_path) if "partial" in f] == []


def test_output_rules(mxfile, tmp_path):
    p, _, _ = mxfile
    before = sha(p)
    fp8 = tmp_path / "fp8.safetensors"
    build_fp8(fp8)
    fp8_before = sha(fp8)
    with pytest.raises(OutputFileError, match="equals the --tensor-scales file"):
        make_hybrid_mxfp8(p, fp8, tensor_scales=fp8, overwrite=True)
    assert sha(fp8) == fp8_before
    with pytest.raises(InputFileError, match="does not exist"):
        make_hybrid_mxfp8(p, tmp_path / "o.safetensors", tensor_scales=tmp_path / "missing.safetensors")
    with pytest.raises(OutputFileError, match="output is the input"):
        make_hybrid_mxfp8(p, p, overwrite=True)
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(OutputFileError, match="exists"):
        make_hybrid_mxfp8(p, out)
    assert out.read_bytes() == b"x"
    make_hybrid_mxfp8(p, out, overwrite=True)
    assert load(out)[0]
    assert sha(p) == before


# ------------------------------------------------------------------------------------------------
# Through the convert_to_quant CLI: MXFP8 and FP8 files made by the CLI, then --make-hybrid-mxfp8
# ------------------------------------------------------------------------------------------------

# the shared CLI runner (tests/convert_helpers.py); these tests check the exit code themselves
run_cli = functools.partial(convert_helpers.run_cli, check=False)


def test_cli_make_hybrid_with_tensor_scales(tmp_path):
    from hybridquant.converter.formats.hybrid_mxfp8 import to_tensorwise_fp8

    g = torch.Generator().manual_seed(5)
    ws = {"blk.0.attn": torch.randn(64, 128, generator=g) * 0.05, "blk.1.mlp": torch.randn(48, 80, generator=g)}
    ws["blk.0.attn"][3, 7] = 1.5  # an outlier
    src = tmp_path / "model.safetensors"
    save_file({**{f"{k}.weight": v.to(torch.bfloat16) for k, v in ws.items()}, "norm.weight": torch.ones(64)}, str(src))
    mxf, fp8 = tmp_path / "mx.safetensors", tmp_path / "fp8.safetensors"
    for out, flags in ((mxf, ["--mxfp8"]), (fp8, [])):
        r = run_cli("-i", src, "-o", out, "--simple", "-q", *flags)
        assert r.returncode == 0, r.stderr
    mx_before = sha(mxf)

    hy = tmp_path / "hybrid.safetensors"
    r = run_cli("-i", mxf, "-o", hy, "--make-hybrid-mxfp8", "--tensor-scales", fp8, "-q", subprocess_=True)
    assert r.returncode == 0, r.stderr
    t_mx, _ = load(mxf)
    t_fp8, _ = load(fp8)
    t_hy, meta = load(hy)
    assert sha(mxf) == mx_before
    hcodec, mcodec = get_codec("hybrid_mxfp8"), get_codec("mxfp8")
    for L, w in ws.items():
        shape = tuple(w.shape)
        assert json.loads(bytes(t_hy[f"{L}.comfy_quant"].tolist()))["format"] == "hybrid_mxfp8"
        assert json.loads(meta[QM])["layers"][L]["format"] == "hybrid_mxfp8"
        # The scalar is the FP8 file's tensorwise scale, bit for bit.
        assert torch.equal(t_hy[f"{L}.weight_scalar"], t_fp8[f"{L}.weight_scale"].float().reshape(()))
        tensors = {k: t_hy[f"{L}.{k}"] for k in ("weight", "weight_scale", "weight_scalar")}
        # The MXFP8 part decodes exactly like the MXFP8 file.
        assert torch.equal(hcodec.dequantize(tensors, shape),
                           mcodec.dequantize({k: t_mx[f"{L}.{k}"] for k in ("weight", "weight_scale")}, shape))
        q, scale = to_tensorwise_fp8(tensors, shape)
        deq = q[: shape[0], : shape[1]].float() * scale.float()
        wf = w.to(torch.bfloat16).float()
        rel = float((deq - wf).norm() / wf.norm())
        assert rel < 0.1, (L, rel)
    assert torch.equal(t_hy["norm.weight"], t_mx["norm.weight"])

    # Without --tensor-scales (underscore spelling): the scalar comes from the block scales.
    hy2 = tmp_path / "hybrid2.safetensors"
    r = run_cli("-i", mxf, "-o", hy2, "--make_hybrid_mxfp8", "-q")
    assert r.returncode == 0, r.stderr
    t2, _ = load(hy2)
    for L in ws:
        assert float(t2[f"{L}.weight_scalar"]) == max_block_scale(t2[f"{L}.weight_scale"])

    r = run_cli("-i", fp8, "-o", tmp_path / "no.safetensors", "--make-hybrid-mxfp8")
    assert r.returncode == 2 and "no MXFP8 layers" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("-i", mxf, "-o", tmp_path / "no.safetensors", "--make-hybrid-mxfp8", "--tensor-scales", src)
    assert r.returncode == 2 and "--tensor-scales" in r.stderr and "none of the 2 MXFP8 layers" in r.stderr
    assert not (tmp_path / "no.safetensors").exists()
