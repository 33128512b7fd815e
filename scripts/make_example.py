"""Regenerate ``examples/flux_like_tiny.safetensors``: the small bundled checkpoint of the README's main job.

A Flux.1-shaped diffusion transformer at toy width (hidden 128 instead of 3072; 2 double and 2 single
blocks), with Flux's real layer names, bf16, and the heavy-tailed weights real checkpoints have
(Gaussian plus 0.1 % outliers of 10-40x), so the converter's presets, plan and error statistics do what
they do on a real model. Fixed seed; the file is committed (about 3 MB).

    .venv/bin/python scripts/make_example.py [--out examples/flux_like_tiny.safetensors]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
H = 128
try:
    import hybridquant  # noqa: F401  (the editable install of scripts/setup_env.sh)
except ImportError:  # a bare checkout: make it importable under its package name
    import tempfile

    _p = Path(tempfile.mkdtemp(prefix="hq-path-"))
    (_p / "hybridquant").symlink_to(REPO)
    sys.path.insert(0, str(_p))


def layers() -> list[tuple[str, tuple[int, ...]]]:
    t = [("img_in.weight", (H, 64)), ("img_in.bias", (H,)), ("txt_in.weight", (H, 256)), ("txt_in.bias", (H,)),
         ("time_in.in_layer.weight", (H, 256)), ("time_in.out_layer.weight", (H, H)),
         ("vector_in.in_layer.weight", (H, 96)), ("vector_in.out_layer.weight", (H, H)),
         ("guidance_in.in_layer.weight", (H, 256)), ("guidance_in.out_layer.weight", (H, H))]
    for i in range(2):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            t += [(f"{b}_mod.lin.weight", (6 * H, H)), (f"{b}_mod.lin.bias", (6 * H,)),
                  (f"{b}_attn.qkv.weight", (3 * H, H)), (f"{b}_attn.qkv.bias", (3 * H,)),
                  (f"{b}_attn.norm.query_norm.scale", (32,)), (f"{b}_attn.norm.key_norm.scale", (32,)),
                  (f"{b}_attn.proj.weight", (H, H)), (f"{b}_attn.proj.bias", (H,)),
                  (f"{b}_mlp.0.weight", (4 * H, H)), (f"{b}_mlp.0.bias", (4 * H,)),
                  (f"{b}_mlp.2.weight", (H, 4 * H)), (f"{b}_mlp.2.bias", (H,))]
    for i in range(2):
        b = f"single_blocks.{i}"
        t += [(f"{b}.linear1.weight", (7 * H, H)), (f"{b}.linear1.bias", (7 * H,)),
              (f"{b}.linear2.weight", (H, 5 * H)), (f"{b}.linear2.bias", (H,)),
              (f"{b}.modulation.lin.weight", (3 * H, H)), (f"{b}.norm.query_norm.scale", (32,))]
    t += [("final_layer.adaLN_modulation.1.weight", (2 * H, H)), ("final_layer.linear.weight", (64, H)),
          ("final_layer.linear.bias", (64,))]
    return t


def main(argv=None) -> int:
    from hybridquant.converter.formats.base import TensorSpec
    from hybridquant.converter.safetensors_writer import AtomicSafetensorsWriter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "examples" / "flux_like_tiny.safetensors"))
    a = ap.parse_args(argv)
    spec = layers()
    g = torch.Generator().manual_seed(20261124)
    meta = {"modelspec.title": "flux-like tiny example (synthetic)", "modelspec.architecture": "flux-1-dev",
            "modelspec.description": "Toy-width Flux.1 layout for the HybridQuant README example; not a usable model."}
    with AtomicSafetensorsWriter(a.out, {n: TensorSpec(torch.bfloat16, s) for n, s in spec}, meta, overwrite=True) as w:
        for name, shape in spec:
            std = 0.02 if name.endswith(".weight") else 0.01
            x = torch.randn(shape, generator=g) * std
            if name.endswith(".scale"):
                x = 1.0 + x
            elif len(shape) == 2:
                n = max(1, x.numel() // 1000)
                idx = torch.randint(0, x.numel(), (n,), generator=g)
                x.view(-1)[idx] = (torch.rand(n, generator=g) * 30 + 10) * std * torch.sign(torch.randn(n, generator=g))
            w.write(name, x.to(torch.bfloat16))
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
