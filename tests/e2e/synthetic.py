"""Tiny synthetic checkpoints of REAL architectures, built from ComfyUI's own model classes.

We instantiate ComfyUI's ``MMDiT`` (SD3) and ``CLIPTextModel`` (CLIP-L) with random weights and save
their state dicts, so the key names and shapes are exactly what ComfyUI's model detection expects
(no hand-written key lists that could drift from ComfyUI). Nothing is downloaded.

- SD3 MMDiT: depth d => hidden 64*d, d heads (ComfyUI derives both from ``x_embedder``), 16 latent
  channels, patch 2, ``context_embedder`` 4096 -> hidden (CLIP-L's 768 features zero-padded to 4096 as
  SD3 does without T5), ``y_embedder`` 2048 (CLIP-L pooled 768 + zero CLIP-G part). A small
  ``pos_embed_max_size`` keeps the positional table tiny.
- CLIP-L: ComfyUI's fixed CLIP-L config (12 layers, 768 wide, 123M parameters): ComfyUI builds the
  text encoder from that config, not from the file, so a smaller one would load garbage into the
  missing layers. Stored in fp16 (~246 MB).

Weights: Linear/conv weights ~ N(0, 1/fan_in) so activations stay O(1) through the blocks;
embeddings N(0, 0.02); norms 1, biases 0. A fixed seed makes every file reproducible.
"""

from __future__ import annotations

import math

import torch


def _init_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # Buffers too: ComfyUI's MMDiT registers pos_embed as a buffer created with torch.empty, so
    # leaving it alone gives garbage (sometimes huge or NaN) that differs from run to run.
    tensors = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    with torch.no_grad():
        for name, p in tensors:
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2 and "embedding" not in name and "pos_embed" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "embedding" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif leaf == "bias":
                p.zero_()
            else:  # norm scales
                p.fill_(1.0)


def sd3_mmdit_state_dict(depth: int = 2, seed: int = 0, pos_embed_max_size: int = 16) -> dict[str, torch.Tensor]:
    """State dict (no prefix, as in models/diffusion_models files) of a ``depth``-block SD3 MMDiT."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    hidden = 64 * depth
    model = MMDiT(
        patch_size=2, in_channels=16, out_channels=16, depth=depth, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": hidden}},
        pos_embed_max_size=pos_embed_max_size, num_patches=pos_embed_max_size ** 2,
        pos_embed_scaling_factor=None, input_size=None,
        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init,
    )
    _init_(model, seed)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in sd.values())
    return sd


def clip_l_state_dict(seed: int = 0, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """State dict of a CLIP-L text encoder in the HF layout ComfyUI's text_encoders loader reads."""
    import json
    import os

    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip

    cfg_path = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    model = comfy.clip_model.CLIPTextModel(cfg, torch.float32, "cpu", comfy.ops.disable_weight_init)
    _init_(model, seed)
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
