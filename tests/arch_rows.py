"""Running one row of the architecture matrix (issue 15 items 1 and 3): convert a builder's seeded
bf16 file (``arch_models``) per format, check stock detection, load it through the pack's and the stock
loaders, run a forward and compare to bf16 within the format's tolerance.
Shared by tests/test_arch_matrix.py and bench/arch_matrix.py.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from arch_models import BUILDERS, TOKENS, Arch, seeded_state_dict

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
