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
``arch_matrix_lib``).

Values: seeded per tensor name (crc32), scaled so activations stay O(1) through the block.
Shared by tests/test_arch_matrix.py and bench/arch_matrix.py.
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


# ---- running one row of the matrix --------------------------------------------------------------------
# Tolerance on the relative L2 error of the model output vs the bf16 file's output (same inputs, same
# ComfyUI compute dtype). Round-to-nearest on these Gaussian-like weights has a relative RMS weight
# error e_w per format, from its grid: FP8 e4m3 (3 mantissa bits, half-ulp 2^-4 relative, uniform)
# ~3.6% (MXFP8 the same grid); e5m2 (2 bits) ~7%; INT8 per tensor (step 2*max/255, max ~5.5 sigma over
# 40 M weights) ~1.3%; INT6/INT5 per group (63/31 levels over +-3 sigma) ~2.7%/5.5%; 4-bit grids (NVFP4
# e2m1 per 16, NF4/FP4 per 64, int4 per group) ~10-12%. The output error is e_w times a model factor:
# independent errors of the 3-6 quantized Linears of a block add roughly in quadrature on the residual
# stream, a gated MLP multiplies two quantized projections (their errors add), and CLIP-L chains 12
# layers; measured factors are 1-3.5 (T5-XXL's gated block the largest). We allow 4 x e_w, rounded.
# Stock 0.33 runs INT8 tensorwise as W8A8 and ConvRot as W4A4 (activations rounded per token too: another
# e_w of the same size, so sqrt(2) x): INT8 4 x 1.3% x 1.4 = 0.08 (T5-XXL's stock row measured 0.062);
# ConvRot's int4 per 256-group after rotation (step ~0.4 sigma: 11.5%) x 1.4 x 4 = 0.65 -> 0.7 (T5: 0.59).
TOLERANCE = {
    "float8_e4m3fn": 0.15, "float8_e4m3fn_rowwise": 0.15, "float8_e4m3fn_blockwise": 0.15,
    "float8_e5m2": 0.29, "int8_tensorwise": 0.08, "int8_blockwise": 0.06, "mxfp8": 0.15, "hybrid_mxfp8": 0.15,
    "int6_groupwise": 0.11, "int5_groupwise": 0.22, "nvfp4": 0.45, "bnb_nf4": 0.45, "bnb_fp4": 0.5,
    "convrot_w4a4": 0.7, "asym_w4a8_int8": 0.45,
}
# What CI runs for every architecture (one 8-bit, one 4-bit format; the rest with HYBRIDQUANT_ARCH_FULL=1):
# FP8 is what stock 0.3.75 loads; NVFP4 is the format whose packed shapes broke stock detection.
CI_FORMATS = ("float8_e4m3fn", "nvfp4")
PROMPT = "a photo of a red fox in the snow"
# Measured on 0.33 (and read in comfy/sd.py): stock load_clip hands `.comfy_quant` metadata only to the
# encoders it plumbs it for (T5-XXL, the LLMs: `*_quantization_metadata`), not to CLIP-L, whose
# SDClipModel then gets plain ops: FP8/INT8 weights load without their scales (output rel err 0.97),
# packed 4-bit ones fail on the shape. Quantized CLIP-L files need the pack's loader.
STOCK_CLIP_L = "stock load_clip ignores .comfy_quant for CLIP-L"


def formats() -> tuple[str, ...]:
    from hybridquant.converter.formats import registry

    return registry.format_names()


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def select(name: str) -> tuple[Arch | None, str]:
    """The first candidate of ``name`` this tree has and detects with our widths; else (None, why)."""
    why = []
    for a in BUILDERS[name]():
        try:
            mod = importlib.import_module(a.module)
        except ImportError as e:
            return None, f"not in this core: no module {a.module} ({e})"
        if not hasattr(mod, a.cls):
            return None, f"not in this core: {a.module} has no {a.cls}"
        if a.kind != "unet":
            return a, ""
        cfg = detect_unet(a.build("meta").state_dict(), a.prefix)
        bad = config_mismatch(a, cfg)
        if not bad:
            return a, ""
        why.append(f"{a.variant}: this core detects {bad}")
    return None, "; ".join(why)


def detect_unet(sd: dict, prefix: str = "") -> dict | None:
    import comfy.model_detection as md

    return md.detect_unet_config(sd, prefix)


def config_mismatch(a: Arch, cfg: dict | None) -> dict:
    if not cfg:
        return {"detected": None}
    return {k: cfg.get(k) for k in a.checks if _norm(cfg.get(k)) != _norm(a.kwargs[k])}


def header_tensors(path: str) -> dict:
    """The file's tensors as meta tensors of their stored shapes and dtypes: what a stock loader hands
    to detection, without reading the data."""
    from hybridquant.converter.safetensors_io import read_header

    infos, _ = read_header(path)
    return {name: torch.empty(tuple(i.shape), device="meta", dtype=i.dtype) for name, i in infos.items()}


def detect_file(a: Arch, path: str, prefix: str | None = None):
    """What stock ComfyUI detects from the file's stored shapes: the unet config (under ``prefix``:
    re-keyed, as a full checkpoint names them) or the text-encoder type name."""
    sd = header_tensors(path)
    if a.kind == "unet":
        if prefix:
            sd = {prefix + k: v for k, v in sd.items()}
        return detect_unet(sd, prefix if prefix else a.prefix)
    import comfy.sd

    te = comfy.sd.detect_te_model(sd)
    return getattr(te, "name", te)


T5_DETECT_BLOCK = "encoder.block.23."  # the block whose shapes sd.detect_te_model reads


def make_source(a: Arch, path: str, seed: int = 0) -> None:
    from safetensors.torch import save_file

    sd = seeded_state_dict(a.build("meta"), a.prefix, seed)
    if a.kind == "t5":
        # Detection reads block 23 of the 24-block encoder: the file carries a real block 23 (block 0's
        # values; the relative attention bias lives in block 0 only), so the converter plans it as it
        # would in a full file and detection reads what it wrote. The loaders drop it (1-block class).
        sd.update({k.replace("encoder.block.0.", T5_DETECT_BLOCK, 1): v.clone() for k, v in sd.items()
                   if k.startswith("encoder.block.0.") and "relative_attention_bias" not in k})
    save_file(sd, path)


def quant_algos() -> frozenset:
    from hybridquant.ops.capabilities import core_quant_algos

    return core_quant_algos() or frozenset()


def convert(a: Arch, src: str, dst: str, fmt: str):
    """The converter's API as the CLI calls it for ``--format FMT --<preset>``."""
    from hybridquant.converter.convert import convert_file
    from hybridquant.converter.plan import PlanOptions

    opts = PlanOptions(mode=fmt, presets=(a.preset,) if a.preset else ())
    return convert_file(src, dst, opts, error_stats=False, overwrite=True)


# Loaded models -----------------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: object  # ModelPatcher (unet), CLIP (clip) or the T5 module (t5)
    config: object  # what the loader built: unet_config / TE type / None


def load(a: Arch, path: str, stock: bool) -> Loaded:
    if a.kind == "unet":
        import comfy.sd

        if stock:  # the stock UNETLoader's call
            patcher = comfy.sd.load_diffusion_model(path)
        else:  # the pack's Load Diffusion Model node's call
            from hybridquant.nodes import backend

            patcher, _ = backend.load_diffusion_model(path)
        return Loaded(patcher, dict(patcher.model.model_config.unet_config))
    if a.kind == "clip":
        import comfy.sd

        if stock:
            clip = comfy.sd.load_clip(ckpt_paths=[path], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
        else:
            from hybridquant.nodes import backend

            clip, _ = backend.load_clip([path], "stable_diffusion")
        return Loaded(clip, type(clip.cond_stage_model).__name__)
    return Loaded(_load_t5(a, path, stock), None)


def _load_t5(a: Arch, path: str, stock: bool):
    """ComfyUI's T5 class (1 block) with the ops each loader would give it (ComfyUI's own load_clip
    would build 24 blocks = 4.7 B parameters): the pack's (``backend.pick_ops`` + ``prepare``, as its Load CLIP
    node), or stock's (comfy/sd1_clip.py ``SDClipModel``: ``mixed_precision_ops`` for files with
    quantized layers, ``manual_cast`` otherwise, in each tree's own way)."""
    import comfy.ops
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    metadata = metadata or {}
    if stock:
        if hasattr(comfy.utils, "detect_layer_quantization"):  # 0.33: {"mixed_ops": True} marker
            quant = comfy.utils.detect_layer_quantization(sd, "")
        else:  # 0.3.75: the header's layer table
            quant = json.loads(metadata["_quantization_metadata"]).get("layers") if "_quantization_metadata" in metadata else None
        ops = comfy.ops.mixed_precision_ops(quant, torch.bfloat16, full_precision_mm=True) if quant else comfy.ops.manual_cast
    else:
        from hybridquant.nodes import backend

        ops = backend.pick_ops(sd.keys(), metadata)
        sd = backend.prepare(sd, metadata)
    sd = {k: v for k, v in sd.items() if not k.startswith(T5_DETECT_BLOCK)}  # see make_source
    model = a.build("cpu", operations=ops)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith((".weight_scale", ".input_scale"))]
    # 0.3.75's ops do not consume `.comfy_quant` tensors; its CLIP.load_sd only logs such leftovers
    unexpected = [k for k in unexpected if not k.endswith(".comfy_quant")]
    if missing or unexpected:
        raise RuntimeError(f"T5 load: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def forward(a: Arch, loaded: Loaded, seed: int = 1234) -> torch.Tensor:
    """One forward at tiny token counts (float32 result)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if a.kind == "unet":
            x, kw = a.inputs(gen)
            # the diffusion model's own output (apply_model returns the denoised latent, which for
            # these flow models is x - sigma * output: dominated by x, it would hide the error)
            got = []
            dm = loaded.model.model.diffusion_model
            hook = dm.register_forward_hook(lambda mod, args, out: got.append(out))
            try:
                loaded.model.model.apply_model(x, torch.tensor([0.6]), **kw)
            finally:
                hook.remove()
            out = got[0][0] if isinstance(got[0], tuple) else got[0]
            return out.float()
        if a.kind == "clip":
            clip = loaded.model
            cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
            return torch.cat([cond.flatten(), pooled.flatten()]).float()
        ids = torch.randint(1, 32000, (1, TOKENS), generator=gen)
        # compute in the ops' dtype (bf16): stock's SDClipModel feeds float32 embeds into a model built
        # in the file's dtype, a path this class-level load does not reproduce
        out = loaded.model(ids, None, dtype=torch.bfloat16)
        return (out[0] if isinstance(out, tuple) else out).float()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y - ref).norm() / ref.norm().clamp_min(1e-12))


def unload(loaded: Loaded | None) -> None:
    import gc

    import comfy.model_management as mm

    if loaded is not None:
        del loaded.model
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


# The matrix: a source per architecture, a row per format ------------------------------------------------
@dataclass
class Source:
    arch: Arch
    dir: Path
    path: str  # the bf16 file
    detected: object  # stock detection of the bf16 file (unet config / TE type)
    built: object  # what the stock loader built from it
    ref: torch.Tensor  # its forward
    converted: dict = field(default_factory=dict)  # format -> (path, ConversionReport)
    rows: dict = field(default_factory=dict)  # format -> Row (run_row once per format)

    def row(self, fmt: str, stock: bool | None = None) -> Row:
        if fmt not in self.rows:
            self.rows[fmt] = run_row(self, fmt, stock)
        return self.rows[fmt]

    def convert(self, fmt: str):
        if fmt not in self.converted:
            dst = str(self.dir / f"{self.arch.row}_{fmt}.safetensors")
            self.converted[fmt] = (dst, convert(self.arch, self.path, dst, fmt))
        return self.converted[fmt]

    def drop(self, fmt: str) -> None:
        path, _ = self.converted.pop(fmt, (None, None))
        if path:
            Path(path).unlink(missing_ok=True)


def make_matrix_source(a: Arch, directory: Path) -> Source:
    path = str(directory / f"{a.row}_bf16.safetensors")
    make_source(a, path)
    loaded = load(a, path, stock=True)
    try:
        ref = forward(a, loaded)
        built = loaded.config
    finally:
        unload(loaded)
    return Source(a, directory, path, detect_file(a, path), built, ref)


@dataclass
class Row:
    arch: str
    variant: str
    fmt: str
    quantized: int = 0  # layers written in the format
    kept_detection: list = field(default_factory=list)  # layers the detection-safe rule kept
    detect: str = ""  # "same" or what differs (stock detection of the stored shapes)
    pack: str = ""  # "ok" / "error: ..." (load + forward through the pack's loader)
    pack_err: float | None = None
    stock: str = ""  # "ok" / "n/a (...)" / "error: ..."
    stock_err: float | None = None
    seconds: float = 0.0

    @property
    def tol(self) -> float:
        return TOLERANCE[self.fmt]


def _loaded_check(src: Source, loaded: Loaded) -> str:
    """"" when the loader built the model the bf16 file gives, else what differs."""
    if src.arch.kind == "t5":
        return ""
    if loaded.config == src.built:
        return ""
    if isinstance(src.built, dict):
        diff = {k: loaded.config.get(k) for k in src.built if _norm(loaded.config.get(k)) != _norm(src.built[k])}
        return f"built config differs: {diff}"
    return f"built {loaded.config} instead of {src.built}"


def run_row(src: Source, fmt: str, stock: bool | None = None) -> Row:
    """Convert, detect, load (pack; stock when the core names ``fmt``), forward, compare."""
    import time

    from hybridquant.converter.detection import DETECTION_SAFE

    t0 = time.monotonic()
    a = src.arch
    row = Row(a.row, a.variant, fmt)
    path, report = src.convert(fmt)
    row.quantized = sum(1 for r in report.layers if r.format == fmt)
    row.kept_detection = [r.name for r in report.layers if (getattr(r, "reason", "") or "").startswith(DETECTION_SAFE)]
    got = detect_file(a, path)
    row.detect = "same" if got == src.detected else f"differs: {got!r}"
    if a.kind == "unet" and row.detect == "same":  # full checkpoints name the same keys with a prefix
        pre = "model.diffusion_model."
        if detect_file(a, path, pre) != detect_file(a, src.path, pre):
            row.detect = f"differs under {pre!r}"
    for which in (False, True):
        if which and not (fmt in quant_algos() if stock is None else stock):
            row.stock = "n/a (not in this core's QUANT_ALGOS)"
            continue
        if which and a.kind == "clip":
            row.stock = f"n/a ({STOCK_CLIP_L})"
            continue
        loaded = None
        try:
            loaded = load(a, path, stock=which)
            bad = _loaded_check(src, loaded)
            err = rel_err(forward(a, loaded), src.ref)
            status = bad or "ok"
        except Exception as e:  # noqa: BLE001 - a row records any failure; the test fails on it
            err, status = None, f"error: {type(e).__name__}: {str(e)[:200]}"
        finally:
            unload(loaded)
        if which:
            row.stock, row.stock_err = status, err
        else:
            row.pack, row.pack_err = status, err
    row.seconds = time.monotonic() - t0
    return row
