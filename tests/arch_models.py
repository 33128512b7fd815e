"""The architecture matrix's builders (issue 15 item 1): ComfyUI's own model classes at real widths.

One small function per architecture returns :class:`Arch` candidates: the class from the ComfyUI tree
under test (``comfy/ldm/<arch>/model.py``, cited per builder), constructor arguments with the widths
of a real released checkpoint (hidden size, heads, MLP ratio, text-encoder width; depth reduced to
1-2 blocks), the key prefix real files use, the converter preset, and tiny forward inputs. The first
candidate whose widths the tree's own detection (``comfy/model_detection.py``) reads back is used: a
core too old for a variant (0.3.75 hard-codes Flux.2's 48 heads, so Flux.2 [klein] cannot be
detected there) falls back to the next real variant, and a missing module gives a skip reason.

Real widths, one exception: Wan uses Wan 2.1 **1.3B** (dim 1536), the family's smallest real variant;
14B (dim 5120: 0.7 GB per block in bf16) costs too much CPU time for CI. Text encoders: CLIP-L is
built whole (12 layers, 123 M parameters: ComfyUI's loader builds its fixed config, so depth cannot be
reduced); T5-XXL at its real width with 1 block (ComfyUI's T5-XXL config fixes 24 blocks = 4.7 B
parameters, too big for a CPU test, so it is loaded into the tree's own ``T5`` class directly, see
``arch_rows``).

Values: seeded per tensor name (crc32), scaled so activations stay O(1) through the block.
Used by tests/arch_rows.py (tests/test_arch_matrix.py, bench/arch_matrix.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

TOKENS = 8  # text tokens of every forward (CPU: tiny)


@dataclass(frozen=True)
class Arch:
    row: str  # table row / preset family name
    variant: str  # the released checkpoint whose widths are used
    module: str  # module of the tree that defines the class
    cls: str
    kwargs: dict
    preset: str | None  # converter preset (converter/presets.py)
    source: str  # file of the tree this builder follows
    kind: str = "unet"  # "unet" (diffusion model), "clip" (CLIP-L via load_clip), "t5" (T5 class)
    prefix: str = ""  # key prefix of real files of this kind
    inputs: Callable | None = field(default=None, compare=False)  # gen -> (x, kwargs for apply_model)
    checks: tuple[str, ...] = ()  # detect_unet_config keys that must equal kwargs (same name)
    params_class: str | None = None  # dataclass of the constructor's **kwargs (filters to the tree's fields)
    heavy: str = ""  # why CI skips it (run with HYBRIDQUANT_ARCH_FULL=1); "" = cheap enough for CI

    def build(self, device="meta", operations=None, dtype=torch.bfloat16):
        import comfy.ops

        mod = importlib.import_module(self.module)
        kw = dict(self.kwargs)
        if self.kind in ("t5", "clip"):
            pass
        elif self.params_class is not None:  # newer trees add fields; older ones lack some of ours
            fields = {f.name for f in dataclasses.fields(getattr(mod, self.params_class))}
            kw = {k: v for k, v in kw.items() if k in fields}
        else:  # plain keyword constructors: drop what this tree's class does not take
            params = inspect.signature(getattr(mod, self.cls).__init__).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                kw = {k: v for k, v in kw.items() if k in params}
        ops = operations or comfy.ops.disable_weight_init
        if self.kind in ("t5", "clip"):  # text encoders take ComfyUI's JSON config
            return getattr(mod, self.cls)(te_config(self), dtype, device, ops)
        return getattr(mod, self.cls)(dtype=dtype, device=device, operations=ops, **kw)


def _g(gen, *shape):
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


# ---- diffusion models -----------------------------------------------------------------------------
def _flux_inputs(ch, ctx_dim, vec=768, guidance=True, hw=8):
    def make(gen):
        kw = {"c_crossattn": _g(gen, 1, TOKENS, ctx_dim)}
        if vec:
            kw["y"] = _g(gen, 1, vec)
        if guidance:
            kw["guidance"] = torch.tensor([3.5])
        return _g(gen, 1, ch, hw, hw), kw
    return make


def flux1() -> list[Arch]:
    """Flux.1-dev (comfy/ldm/flux/model.py ``Flux``): 3072 wide, 24 heads, MLP 4, T5-XXL 4096, CLIP-L 768."""
    kw = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
              mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
              patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
    return [Arch("flux1", "Flux.1-dev", "comfy.ldm.flux.model", "Flux", kw, "flux1", "comfy/ldm/flux/model.py",
                 inputs=_flux_inputs(16, 4096), params_class="FluxParams",
                 checks=("hidden_size", "num_heads", "context_in_dim", "vec_in_dim", "depth", "depth_single_blocks",
                         "in_channels", "guidance_embed"))]


def flux2() -> list[Arch]:
    """Flux.2 (comfy/ldm/flux/model.py ``Flux`` with global modulation, SiLU-gated MLP 3.0, patch 1, 128
    latent channels). [klein] 4B: 3072 wide, 24 heads, Qwen3-4B text (3 x 2560 = 7680); needs a core
    that derives the heads from the width (0.33). Else Flux.2 [dev]: 6144 wide, 48 heads, Mistral
    Small 3.1 text (3 x 5120 = 15360), 0 single blocks (one double block is 2 GB in bf16)."""
    base = dict(in_channels=128, out_channels=128, vec_in_dim=None, mlp_ratio=3.0, axes_dim=[32, 32, 32, 32],
                theta=2000, patch_size=1, qkv_bias=False, global_modulation=True, mlp_silu_act=True, ops_bias=False,
                default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3])
    checks = ("hidden_size", "num_heads", "context_in_dim", "depth", "depth_single_blocks", "in_channels",
              "guidance_embed")
    klein = dict(base, context_in_dim=7680, hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1,
                 guidance_embed=False)
    dev = dict(base, context_in_dim=15360, hidden_size=6144, num_heads=48, depth=1, depth_single_blocks=0,
               guidance_embed=True)
    return [Arch("flux2", name, "comfy.ldm.flux.model", "Flux", kw, "flux2", "comfy/ldm/flux/model.py",
                 inputs=_flux_inputs(128, kw["context_in_dim"], vec=0, guidance=kw["guidance_embed"], hw=4),
                 params_class="FluxParams", checks=checks, heavy=heavy)
            for name, kw, heavy in (("Flux.2 [klein] 4B", klein, ""),
                                    ("Flux.2 [dev]", dev, "1.8 B parameters in one double block (3.6 GB bf16)"))]


def chroma() -> list[Arch]:
    """Chroma1-HD (comfy/ldm/chroma/model.py ``Chroma``): Flux.1 widths without CLIP/guidance inputs,
    the distilled guidance approximator (5 layers, 5120 wide, fixed by detection)."""
    kw = dict(in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24,
              depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
              in_dim=64, out_dim=3072, hidden_dim=5120, n_layers=5, txt_ids_dims=[], vec_in_dim=None)

    def make(gen):
        return _g(gen, 1, 16, 8, 8), {"c_crossattn": _g(gen, 1, TOKENS, 4096), "guidance": torch.tensor([0.0])}
    return [Arch("chroma", "Chroma1-HD", "comfy.ldm.chroma.model", "Chroma", kw, "chroma", "comfy/ldm/chroma/model.py",
                 inputs=make, params_class="ChromaParams",
                 checks=("hidden_size", "num_heads", "context_in_dim", "depth", "depth_single_blocks", "hidden_dim"))]


def qwen() -> list[Arch]:
    """Qwen-Image (comfy/ldm/qwen_image/model.py ``QwenImageTransformer2DModel``): 24 heads x 128 = 3072,
    Qwen2.5-VL-7B text (3584), 64 packed input channels."""
    kw = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=3584, pooled_projection_dim=768, guidance_embeds=False,
              axes_dims_rope=(16, 56, 56))

    def make(gen):  # process_img takes (b, c, t, h, w)
        return _g(gen, 1, 16, 1, 8, 8), {"c_crossattn": _g(gen, 1, TOKENS, 3584)}
    return [Arch("qwen", "Qwen-Image", "comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel", kw, "qwen",
                 "comfy/ldm/qwen_image/model.py", inputs=make, checks=("in_channels", "num_layers"))]


def wan() -> list[Arch]:
    """Wan 2.1 T2V 1.3B (comfy/ldm/wan/model.py ``WanModel``): dim 1536, 12 heads, FFN 8960, UMT5 4096."""
    kw = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=1536, ffn_dim=8960, freq_dim=256,
              text_dim=4096, out_dim=16, num_heads=12, num_layers=1, window_size=(-1, -1), qk_norm=True,
              cross_attn_norm=True, eps=1e-6)

    def make(gen):
        return _g(gen, 1, 16, 1, 8, 8), {"c_crossattn": _g(gen, 1, TOKENS, 4096)}
    return [Arch("wan", "Wan 2.1 T2V 1.3B", "comfy.ldm.wan.model", "WanModel", kw, "wan", "comfy/ldm/wan/model.py",
                 inputs=make, checks=("dim", "num_heads", "ffn_dim", "num_layers", "out_dim"))]


def hunyuan() -> list[Arch]:
    """HunyuanVideo 1.0 (comfy/ldm/hunyuan_video/model.py ``HunyuanVideo``): 3072 wide, 24 heads, MLP 4,
    LLaVA-Llama-3 text (4096), CLIP-L pooled (768), guidance embedder; token refiner as released."""
    kw = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
              num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2],
              qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, use_cond_type_embedding=False,
              vision_in_dim=None, meanflow_sum=False)

    def make(gen):
        return _g(gen, 1, 16, 1, 8, 8), {"c_crossattn": _g(gen, 1, TOKENS, 4096), "y": _g(gen, 1, 768),
                                         "guidance": torch.tensor([6.0])}
    return [Arch("hunyuan", "HunyuanVideo 1.0", "comfy.ldm.hunyuan_video.model", "HunyuanVideo", kw, "hunyuan",
                 "comfy/ldm/hunyuan_video/model.py", inputs=make, params_class="HunyuanVideoParams",
                 checks=("hidden_size", "num_heads", "context_in_dim", "vec_in_dim", "depth", "depth_single_blocks",
                         "guidance_embed"))]


def zimage() -> list[Arch]:
    """Z-Image Turbo (comfy/ldm/lumina/model.py ``NextDiT`` with Z-Image modulation): dim 3840, 30 heads,
    Qwen3-4B text (2560); the 2 noise + 2 context refiner layers are fixed by the class default."""
    kw = dict(patch_size=2, in_channels=16, dim=3840, n_layers=1, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
              multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
              axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True,
              time_scale=1000.0)

    def make(gen):
        return _g(gen, 1, 16, 8, 8), {"c_crossattn": _g(gen, 1, TOKENS, 2560), "num_tokens": TOKENS}
    return [Arch("zimage", "Z-Image Turbo", "comfy.ldm.lumina.model", "NextDiT", kw, "zimage",
                 "comfy/ldm/lumina/model.py", inputs=make,
                 checks=("dim", "cap_feat_dim", "n_layers", "n_heads", "n_kv_heads", "z_image_modulation"))]


def ltxv() -> list[Arch]:
    """LTX-Video 2B 0.9.x (comfy/ldm/lightricks/model.py ``LTXVModel``): 32 heads x 64 = 2048, T5-XXL
    caption projection (4096), 128 latent channels."""
    kw = dict(in_channels=128, cross_attention_dim=2048, attention_head_dim=64, num_attention_heads=32,
              caption_channels=4096, num_layers=2)

    def make(gen):
        return _g(gen, 1, 128, 2, 4, 4), {"c_crossattn": _g(gen, 1, TOKENS, 4096), "frame_rate": 25,
                                          "attention_mask": torch.ones(1, TOKENS)}
    return [Arch("ltxv", "LTX-Video 2B 0.9", "comfy.ldm.lightricks.model", "LTXVModel", kw, "ltxv",
                 "comfy/ldm/lightricks/model.py", inputs=make,
                 checks=("num_layers", "attention_head_dim", "cross_attention_dim"))]


# ---- text encoders ------------------------------------------------------------------------------------
def t5xxl() -> list[Arch]:
    """T5-XXL encoder (comfy/text_encoders/t5.py ``T5``, config t5_config_xxl.json): d_model 4096, 64 heads,
    d_ff 10240 gated-GELU, 1 block; keys as in t5xxl_fp16.safetensors (no prefix). Used by Flux.1,
    Chroma, LTX-Video, SD3."""
    return [Arch("t5xxl", "T5-XXL (t5xxl_fp16)", "comfy.text_encoders.t5", "T5", {"__config__": "t5_config_xxl.json"},
                 "t5xxl", "comfy/text_encoders/t5.py", kind="t5")]


def clip_l() -> list[Arch]:
    """CLIP-L text encoder, whole (comfy/clip_model.py ``CLIPTextModel``, config sd1_clip_config.json;
    keys as in clip_l.safetensors: ``text_model.*``). Used by Flux.1, HunyuanVideo, SD3. No preset."""
    return [Arch("clip_l", "CLIP ViT-L/14 text (clip_l)", "comfy.clip_model", "CLIPTextModel",
                 {"__config__": "sd1_clip_config.json"}, None, "comfy/clip_model.py", kind="clip")]


BUILDERS: dict[str, Callable[[], list[Arch]]] = {
    "flux1": flux1, "flux2": flux2, "chroma": chroma, "qwen": qwen, "wan": wan, "hunyuan": hunyuan,
    "zimage": zimage, "ltxv": ltxv, "t5xxl": t5xxl, "clip_l": clip_l,
}


def te_config(arch: Arch) -> dict:
    """The tree's own JSON config of a text encoder (T5-XXL reduced to 1 block)."""
    name = arch.kwargs["__config__"]
    path = Path(importlib.import_module("comfy.ops").__file__).parent / ("text_encoders" if arch.kind == "t5" else "") / name
    cfg = json.loads(path.read_text())
    if arch.kind == "t5":
        cfg["num_layers"] = 1
    return cfg


_POOL: torch.Tensor | None = None
_POOL_SIZE = 1 << 25  # 32 M standard normals (64 MB bf16), drawn once


def _pool() -> torch.Tensor:
    """One seeded pool of N(0, 1) values that every tensor takes a window of: drawing 0.5-1 B fresh
    normals per architecture costs ~20 s of CI time, a window costs a copy."""
    global _POOL
    if _POOL is None:
        _POOL = torch.randn(_POOL_SIZE, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    return _POOL


def _normal(shape, name: str, seed: int) -> torch.Tensor:
    """N(0, 1)-distributed values for ``shape``: the pool's window at an offset from the name's crc32
    (different tensors get different windows; tensors larger than the pool repeat it, rolled)."""
    pool, n = _pool(), int(torch.Size(shape).numel())
    off = (zlib.crc32(name.encode()) + seed * 7919) % _POOL_SIZE
    reps = -(-(off + n) // _POOL_SIZE)
    flat = pool.repeat(reps)[off:off + n] if reps > 1 else pool[off:off + n]
    return flat.reshape(shape)  # bf16: scaled in place by the caller, no float32 pass


def seeded_state_dict(model: torch.nn.Module, prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    """Real key names from ComfyUI's own class; values that keep activations O(1): weights
    N(0, 1/sqrt(fan_in)) (variance preserving, so every block's quantized layers weigh on the output
    as much as the kept input/output projections do), modulation tables N(0, 0.02), biases
    N(0, 0.01), norm scales 1."""
    out = {}
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        if not t.is_floating_point():
            v = torch.zeros(shape, dtype=t.dtype)
        elif t.ndim >= 2 and ("modulation" in name or "pad_token" in name or "embedding" in name.split(".")[-1]) \
                and not name.endswith(".weight"):
            v = _normal(shape, name, seed) * 0.02
        elif t.ndim >= 2:
            v = _normal(shape, name, seed) * (1.0 / max(1, t[0].numel()) ** 0.5)
        elif name.endswith("bias"):
            v = _normal(shape, name, seed) * 0.01
        else:  # norm scales / weights, 1-D parameters
            v = torch.ones(shape)
        out[prefix + name] = v.to(torch.bfloat16) if t.is_floating_point() else v
    return out
