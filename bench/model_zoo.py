"""The models of the whole-model benchmark: ComfyUI's own Flux and Wan classes at real widths, seeded
weights saved under the key names ComfyUI's loaders read, LoRA files for them, and their inputs.

Key layout: by default the keys of a ``models/diffusion_models`` file (``double_blocks.0.img_attn.qkv.weight``,
as in BFL's ``flux1-dev.safetensors`` and Comfy-Org's Wan repackages). ``prefix="model.diffusion_model."``
gives a checkpoint's layout instead; ComfyUI 0.3.75's stock loader cannot read an FP8 file in that layout
(it matches the header's layer names without stripping the prefix: model_comfy.stock_support).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import zlib
from pathlib import Path

import torch

# Flux.1-dev and Wan 2.1 14B widths; depth is a field (Flux 19/38 and Wan 40 are the full models).
FLUX = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
            num_heads=24, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
            txt_ids_dims=[], depth=5, depth_single_blocks=10)
FLUX_TINY = dict(FLUX, hidden_size=256, num_heads=2, context_in_dim=128, depth=1, depth_single_blocks=1)
FLUX_FULL_DEPTH = (19, 38)
WAN = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=5120, ffn_dim=13824, freq_dim=256,
           text_dim=4096, out_dim=16, num_heads=40, num_layers=4, window_size=(-1, -1), qk_norm=True,
           cross_attn_norm=True, eps=1e-6)
WAN_TINY = dict(WAN, dim=256, ffn_dim=512, num_heads=2, num_layers=1)
WAN_FULL_DEPTH = 40
WAN_480P_81F_TOKENS = 32760  # 81 frames at 480x832: latent 21x60x104, 2x2 patches
PRESET = {"flux": "flux1", "wan": "wan"}
LORA_LAYERS = {"flux": r"(attn\.(qkv|proj)|single_blocks\.\d+\.linear[12])$",
               "wan": r"(self_attn|cross_attn)\.(q|k|v|o)$"}


@dataclasses.dataclass
class ModelCase:
    kind: str  # "flux" | "wan"
    params: dict
    seed: int = 0
    prefix: str = ""  # key prefix in the saved file ("" = diffusion_models layout)

    def build(self, device="meta"):
        """The model on ``device`` with every parameter in place. A dynamic-VRAM core (aimdo on) builds its
        Linear/Conv layers without weights until a state dict is loaded, so the build turns that off:
        the seeded file must have every key a real checkpoint has."""
        try:
            import comfy.memory_management as cmm
        except ImportError:  # 0.3.75: no dynamic VRAM
            return self._build(device)
        saved = getattr(cmm, "aimdo_enabled", False)
        cmm.aimdo_enabled = False
        try:
            return self._build(device)
        finally:
            cmm.aimdo_enabled = saved

    def _build(self, device):
        import comfy.ops

        if self.kind == "flux":
            from comfy.ldm.flux import model as fm

            fields = {f.name for f in dataclasses.fields(fm.FluxParams)}
            kw = {k: v for k, v in self.params.items() if k in fields}
            return fm.Flux(dtype=torch.bfloat16, device=device, operations=comfy.ops.disable_weight_init, **kw)
        from comfy.ldm.wan.model import WanModel

        return WanModel(dtype=torch.bfloat16, device=device, operations=comfy.ops.disable_weight_init, **self.params)

    def tag(self) -> str:
        key = json.dumps([self.params, self.seed, self.prefix], sort_keys=True)
        return f"{self.kind}_{zlib.crc32(key.encode()):08x}"

    def depth_label(self) -> str:
        if self.kind == "flux":
            return f"{self.params['depth']}/{self.params['depth_single_blocks']}"
        return str(self.params["num_layers"])


def flux_case(tiny=False, depth=None, full=False, prefix="") -> ModelCase:
    d, s = FLUX_FULL_DEPTH if full else (depth or (FLUX["depth"], FLUX["depth_single_blocks"]))
    p = dict(FLUX_TINY) if tiny else dict(FLUX, depth=d, depth_single_blocks=s)
    return ModelCase("flux", p, prefix=prefix)


def wan_case(tiny=False, depth=None, full=False, prefix="") -> ModelCase:
    p = dict(WAN_TINY) if tiny else dict(WAN, num_layers=WAN_FULL_DEPTH if full else (depth or WAN["num_layers"]))
    return ModelCase("wan", p, prefix=prefix)


def seeded_state_dict(case: ModelCase, gen_device) -> dict:
    """Every key of ComfyUI's own class, seeded values that keep activations O(1)."""
    model = case.build("meta")
    sd = {}
    for name, t in model.state_dict().items():
        g = torch.Generator(device=gen_device).manual_seed(case.seed + zlib.crc32(name.encode()))
        shape = tuple(t.shape)
        if "modulation" in name and t.ndim >= 2 and not name.endswith(".weight"):
            v = torch.randn(shape, generator=g, device=gen_device) * 0.02
        elif t.ndim >= 2:
            fan_in = max(1, t[0].numel())
            v = torch.randn(shape, generator=g, device=gen_device) * (0.5 / fan_in ** 0.5)
        elif name.endswith("bias"):
            v = torch.randn(shape, generator=g, device=gen_device) * 0.01
        else:  # norm scales / weights
            v = torch.ones(shape, device=gen_device)
        sd[case.prefix + name] = v.to(torch.bfloat16).cpu()
    return sd


def save_source(case: ModelCase, path: Path, gen_device) -> None:
    """Write the seeded bf16 file once (reused by later runs with the same work dir)."""
    if path.exists():
        return
    from safetensors.torch import save_file

    t = time.monotonic()
    sd = seeded_state_dict(case, gen_device)
    save_file(sd, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    print(f"[bench_model] {case.kind}: saved {path} ({os.path.getsize(path) / 1e9:.2f} GB, "
          f"{time.monotonic() - t:.1f} s)", flush=True)


def layer_shapes(case: ModelCase, path: Path) -> dict[str, tuple]:
    """Key (without the file's prefix) -> shape, read from the safetensors header."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k[len(case.prefix):]: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def lora_state_dict(shapes: dict, kind: str, rank: int, seed: int = 1) -> dict:
    """Rank-``rank`` LoRA (ComfyUI's generic ``diffusion_model.<layer>.lora_up/down.weight`` names) on the
    attention projections."""
    pat, out = re.compile(LORA_LAYERS[kind]), {}
    for key, shape in shapes.items():
        layer = key[: -len(".weight")]
        if not key.endswith(".weight") or len(shape) != 2 or not pat.search(layer):
            continue
        g = torch.Generator().manual_seed(seed + zlib.crc32(layer.encode()))
        n, k = shape
        base = "diffusion_model." + layer
        out[base + ".lora_down.weight"] = (torch.randn(rank, k, generator=g) / k ** 0.5).to(torch.bfloat16)
        out[base + ".lora_up.weight"] = (torch.randn(n, rank, generator=g) * (0.05 / rank ** 0.5)).to(torch.bfloat16)
        out[base + ".alpha"] = torch.tensor(float(rank))
    return out


def wan_latent(tokens: int, frames: int = 21) -> tuple[int, int, int]:
    """A Wan latent (T, H, W) with about ``tokens`` 1x2x2 patches."""
    if tokens == WAN_480P_81F_TOKENS:
        return (21, 60, 104)
    per = max(1, round(tokens / frames))
    ph = max(1, int(per ** 0.5))
    return (frames, 2 * ph, 2 * -(-per // ph))


def size_label(kind: str, size) -> str | int:
    """What a row's ``size`` says: the Flux image side in pixels, or a Wan latent ``TxHxW``."""
    return size if kind == "flux" else "x".join(map(str, size))


def inputs(case: ModelCase, size, device, text_tokens: int):
    """(x, sigma, kwargs for apply_model, image/video token count) for a Flux image side or a Wan latent."""
    g = torch.Generator().manual_seed(1234)
    ctx_dim = case.params["context_in_dim"] if case.kind == "flux" else case.params["text_dim"]
    ctx = torch.randn(1, text_tokens, ctx_dim, generator=g).to(device, torch.bfloat16)
    sigma = torch.tensor([0.5], device=device)
    if case.kind == "flux":
        x = torch.randn(1, 16, size // 8, size // 8, generator=g).to(device, torch.bfloat16)
        y = torch.randn(1, case.params["vec_in_dim"], generator=g).to(device, torch.bfloat16)
        kw = {"c_crossattn": ctx, "y": y, "guidance": torch.tensor([3.5], device=device)}
        return x, sigma, kw, (size // 16) ** 2
    t, h, w = size
    x = torch.randn(1, 16, t, h, w, generator=g).to(device, torch.bfloat16)
    return x, sigma, {"c_crossattn": ctx}, t * (h // 2) * (w // 2)
