"""Regenerate ``examples/hybridquant_example_sd3_tiny.safetensors``, the pack's bundled example model.

A diffusion model of a REAL architecture that ComfyUI detects and samples: the SD3 MMDiT, at toy size
(depth 2 -> hidden 128, 2 heads of 64, as ComfyUI derives them from ``x_embedder``; 16 latent
channels, patch 2; ``context_embedder`` 4096 -> 128 and ``y_embedder`` 2048 -> 128 as SD3 has them, so
ComfyUI's SD3 text-encoder path (CLIP-L alone works) conditions it; a 16x16 positional table, enough
for latents up to 32x32 = 256x256 pixels). Random weights with the heavy tails real checkpoints have
(Gaussian, 0.1 % outliers of 5-10 sigma in the Linear weights), bf16, fixed seed: it samples (noise),
it is not a usable image model. About 3.8 MB; the file is committed and this script rewrites it byte
for byte (``tests/e2e/test_e2e_examples.py`` checks both, and that the key names and shapes are exactly
what ComfyUI's own MMDiT class has).

It needs no ComfyUI (the README's ``scripts/run_example.sh`` runs on a fresh machine):

    .venv/bin/python scripts/make_example.py [--out examples/hybridquant_example_sd3_tiny.safetensors]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
NAME = "hybridquant_example_sd3_tiny.safetensors"
DEPTH = 2
H = 64 * DEPTH  # hidden size: ComfyUI reads depth = x_embedder rows // 64
CH, PATCH, POS = 16, 2, 16
CONTEXT_IN, ADM_IN = 4096, 2048
try:
    import hybridquant  # noqa: F401  (the editable install of scripts/setup_env.sh)
except ImportError:  # a bare checkout: make it importable under its package name
    import tempfile

    _p = Path(tempfile.mkdtemp(prefix="hq-path-"))
    (_p / "hybridquant").symlink_to(REPO)
    sys.path.insert(0, str(_p))


def _linear(name: str, out_f: int, in_f: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (out_f, in_f)), (f"{name}.bias", (out_f,))]


def layers() -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes, in the order ComfyUI's MMDiT(depth=2) ``state_dict()`` lists them."""
    t = [("pos_embed", (1, POS * POS, H)), ("x_embedder.proj.weight", (H, CH, PATCH, PATCH)),
         ("x_embedder.proj.bias", (H,))]
    t += _linear("t_embedder.mlp.0", H, 256) + _linear("t_embedder.mlp.2", H, H)
    t += _linear("y_embedder.mlp.0", H, ADM_IN) + _linear("y_embedder.mlp.2", H, H)
    t += _linear("context_embedder", H, CONTEXT_IN)
    for i in range(DEPTH):
        for stream in ("context_block", "x_block"):
            b = f"joint_blocks.{i}.{stream}"
            pre_only = stream == "context_block" and i == DEPTH - 1  # SD3's last context block
            t += _linear(f"{b}.attn.qkv", 3 * H, H)
            if not pre_only:
                t += _linear(f"{b}.attn.proj", H, H) + _linear(f"{b}.mlp.fc1", 4 * H, H) + _linear(f"{b}.mlp.fc2", H, 4 * H)
            t += _linear(f"{b}.adaLN_modulation.1", (2 if pre_only else 6) * H, H)
    t += _linear("final_layer.linear", PATCH * PATCH * CH, H) + _linear("final_layer.adaLN_modulation.1", 2 * H, H)
    return t


def tensor(name: str, shape, g: torch.Generator) -> torch.Tensor:
    if name == "pos_embed":
        return torch.randn(shape, generator=g) * 0.02
    if name.endswith(".bias"):
        return torch.zeros(shape)
    fan_in = math.prod(shape[1:])
    x = torch.randn(shape, generator=g) / math.sqrt(fan_in)  # activations stay O(1) through the blocks
    if len(shape) == 2:
        n = max(1, x.numel() // 1000)
        idx = torch.randint(0, x.numel(), (n,), generator=g)
        x.view(-1)[idx] = (torch.rand(n, generator=g) * 5 + 5) / math.sqrt(fan_in) * torch.sign(torch.randn(n, generator=g))
    return x


def main(argv=None) -> int:
    from hybridquant.converter.formats.base import TensorSpec
    from hybridquant.converter.safetensors_writer import AtomicSafetensorsWriter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "examples" / NAME))
    a = ap.parse_args(argv)
    spec = layers()
    g = torch.Generator().manual_seed(20261202)
    meta = {"modelspec.title": "HybridQuant tiny SD3 example (random weights)",
            "modelspec.architecture": "stable-diffusion-v3-medium",
            "modelspec.description": "SD3 MMDiT at toy size (depth 2) for the HybridQuant examples; samples noise."}
    with AtomicSafetensorsWriter(a.out, {n: TensorSpec(torch.bfloat16, s) for n, s in spec}, meta, overwrite=True) as w:
        for name, shape in spec:
            w.write(name, tensor(name, shape, g).to(torch.bfloat16))
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
