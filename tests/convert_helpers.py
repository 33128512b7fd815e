"""Helpers for the converter's CLI/convert tests: small Flux-like checkpoints and an independent decoder.

The decoder reads outputs with the ``safetensors`` library (not our reader), finds the quantized layers
with ``converter.metadata.discover_layers`` and dequantizes with the codecs, so a test checks what a
consumer of the file would compute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]

# (name, shape): Flux-like names, small shapes; some not multiples of 16/32 to exercise padding.
SMALL_LAYERS = [
    ("img_in.weight", (128, 64)), ("img_in.bias", (128,)),
    ("time_in.in_layer.weight", (128, 32)),
    ("double_blocks.0.img_attn.qkv.weight", (192, 128)), ("double_blocks.0.img_attn.qkv.bias", (192,)),
    ("double_blocks.0.img_attn.norm.query_norm.scale", (16,)),
    ("double_blocks.0.img_attn.proj.weight", (128, 128)),
    ("double_blocks.0.img_mlp.0.weight", (256, 128)),
    ("double_blocks.0.img_mlp.2.weight", (128, 256)),
    ("double_blocks.0.txt_mod.lin.weight", (96, 72)),  # ragged: MXFP8/NVFP4 pad it
    ("single_blocks.0.linear1.weight", (320, 128)),
    ("single_blocks.0.linear2.weight", (128, 160)),
    ("final_layer.linear.weight", (16, 128)),
    ("final_layer.adaLN_modulation.1.weight", (256, 128)),
]
METADATA = {"modelspec.title": "tiny flux-like", "modelspec.architecture": "flux-1-dev"}


def make_weights(seed: int = 0, dtype=torch.bfloat16, layers=SMALL_LAYERS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in layers:
        x = torch.randn(shape, generator=g) * 0.02
        if len(shape) == 2:  # a few outliers, like real checkpoints
            idx = torch.randint(0, x.numel(), (max(1, x.numel() // 500),), generator=g)
            x.view(-1)[idx] *= 25
        out[name] = x.to(dtype)
    return out


def write_checkpoint(path: Path, seed: int = 0, dtype=torch.bfloat16, layers=SMALL_LAYERS, metadata=METADATA):
    w = make_weights(seed, dtype, layers)
    save_file(w, str(path), metadata=dict(metadata))
    return w


def run_cli(*args, check: bool = True, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI: in-process through ``cli.main(argv)`` (fast), or as ``python -m
    hybridquant.converter`` in a subprocess (what a user runs). Returns a CompletedProcess either way."""
    if not subprocess_:
        import contextlib
        import io

        from hybridquant.converter.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in args])
        proc = subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())
        if check and rc != 0:
            raise AssertionError(f"CLI failed ({rc}): {args}\n{proc.stdout}\n{proc.stderr}")
        return proc
    proc = subprocess.run([sys.executable, "-m", "hybridquant.converter", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"CLI failed ({proc.returncode}): {args}\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def decode(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    """-> (layer infos, dequantized float32 weights by layer, header metadata, raw tensors)."""
    from hybridquant.converter.formats import get_codec
    from hybridquant.converter.metadata import discover_layers, load_layer_tensors, validate_layer

    tensors, md = load_all(path)
    infos = discover_layers(list(tensors), md, tensors.__getitem__)
    deq = {}
    for layer, info in infos.items():
        lt = load_layer_tensors(info, tensors.__getitem__)
        shape = info.orig_shape or tuple(lt["weight"].shape)
        validate_layer(info, lt, shape)
        opts = {k: v for k, v in info.options.items() if k != "dtype"}
        deq[layer] = get_codec(info.format).dequantize(lt, shape, torch.float32, **opts)
    return infos, deq, md, tensors


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((a.float() - ref).norm() / ref.norm())


def header_layers(md: dict) -> dict:
    q = md.get("_quantization_metadata")
    return json.loads(q)["layers"] if q else {}
