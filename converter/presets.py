"""Model presets: layers that stay in high precision for each supported architecture, and ``--heur``.

Layer names are the state-dict names of the diffusion-model checkpoints as ComfyUI's model code names
its modules (``comfy/ldm/<arch>/model.py``): e.g. Flux's ``img_in``, ``time_in.in_layer``,
``final_layer.linear``. A checkpoint saved with a ``model.diffusion_model.`` prefix matches too,
because every pattern anchors on a dotted-name component, not on the start of the string.

Why these layers: the input/output projections and the timestep/guidance/modulation embedders are a
tiny fraction of the parameters but every token passes through them and errors there are not averaged
out by the residual stream; quantizing them costs visible quality for almost no memory saving.
Embedding tables (``nn.Embedding`` weights are 2-D ``.weight`` tensors too) are never Linear layers
and are always kept: ComfyUI's quantized ops only replace Linear layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def _component(*names: str) -> str:
    """Regex matching any of ``names`` as a whole dotted component sequence of a layer name."""
    alt = "|".join(names)
    return rf"(^|\.)({alt})(\.|$)"


@dataclass(frozen=True)
class Preset:
    flag: str
    title: str
    keep: tuple[str, ...]  # regexes (re.search on the layer name) kept in high precision

    def matcher(self) -> re.Pattern:
        return re.compile("|".join(f"(?:{p})" for p in self.keep))


# Embedding tables of text encoders and transformers: kept in every mode (not Linear layers).
EMBEDDING_TABLES = _component(
    "shared", "embed_tokens", "token_embedding", "position_embedding", "relative_attention_bias",
    "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
    "cond_type_embedding", "addition_t_embedding", "trainable_cond_mask",
)

PRESETS: dict[str, Preset] = {p.flag: p for p in (
    Preset("flux1", "Flux.1 dev/schnell: input/output projections, time/vector/guidance embedders", (
        _component("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"),
    )),
    Preset("flux2", "Flux.2: input/output projections, time/guidance embedders, shared stream modulations", (
        _component("img_in", "txt_in", "time_in", "guidance_in", "final_layer",
                   "double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"),
    )),
    Preset("chroma", "Chroma: distilled guidance approximator, input/output projections", (
        _component("distilled_guidance_layer", "img_in", "txt_in", "final_layer"),
    )),
    Preset("qwen", "Qwen-Image: input/output projections, timestep embedder, output norm, first block's modulation", (
        _component("img_in", "txt_in", "time_text_embed", "norm_out", "proj_out"),
        r"(^|\.)transformer_blocks\.0\.(img_mod|txt_mod)(\.|$)",
    )),
    Preset("wan", "Wan 2.x: text/time embeddings, time projection, image embedder, output head", (
        _component("text_embedding", "time_embedding", "time_projection", "img_emb", "head", "patch_embedding"),
    )),
    Preset("hunyuan", "HunyuanVideo (1.0/1.5): token refiner, time/vector/guidance embedders, vision/byt5 inputs, output", (
        _component("img_in", "txt_in", "time_in", "time_r_in", "vector_in", "guidance_in", "vision_in",
                   "byt5_in", "final_layer"),
    )),
    Preset("zimage", "Z-Image (NextDiT): patch/caption/timestep embedders, refiners' modulation, final layer", (
        _component("x_embedder", "cap_embedder", "t_embedder", "final_layer", "siglip_embedder", "time_text_embed"),
        r"(^|\.)(noise_refiner|context_refiner)\.\d+\.adaLN_modulation(\.|$)",
    )),
    Preset("ltxv", "LTX-Video / LTX-2: patchify/caption projections, adaLN timestep embedders, output projections", (
        _component("patchify_proj", "audio_patchify_proj", "adaln_single", "audio_adaln_single",
                   "caption_projection", "audio_caption_projection", "proj_out", "audio_proj_out",
                   "av_ca_video_scale_shift_adaln_single", "av_ca_audio_scale_shift_adaln_single",
                   "av_ca_a2v_gate_adaln_single", "av_ca_v2a_gate_adaln_single"),
    )),
    Preset("t5xxl", "T5-XXL text encoder: embeddings, relative attention bias, LM head", (
        _component("shared", "embed_tokens", "relative_attention_bias", "lm_head"),
    )),
)}


def preset_help() -> str:
    """Text for ``--help-filters``."""
    lines = ["Model presets (keep sensitive layers in high precision; combine several):", ""]
    for p in PRESETS.values():
        lines.append(f"  --{p.flag:<9} {p.title}")
        for pat in p.keep:
            lines.append(f"              regex: {pat}")
    lines += [
        "",
        "Always kept: embedding tables (2-D .weight tensors that are not Linear layers):",
        f"              regex: {EMBEDDING_TABLES}",
        "",
        "  --heur      skip layers whose shape the chosen format handles badly:",
        "              fewer than 16 input or output features, fewer than 16384 weights, aspect ratio",
        "              above 32 (e.g. Flux img_in 3072x64), and dimensions the format cannot tile without",
        "              padding (FP8/INT8 tensorwise: multiples of 16 for the FP8 matmul; blockwise: multiples",
        "              of the block size; MXFP8: in_features multiple of 32; NVFP4: both multiples of 16).",
        "  --custom-heur  the same checks for the layers chosen by --custom-layers.",
        "",
        "Other filters: --exclude-layers REGEX (keep matching layers), --custom-layers REGEX with",
        "--custom-type (a second format for matching layers; wins over exclusions and presets),",
        "--layer-config FILE.json (regex -> format/options; most specific match wins, '_default').",
        "Regexes use Python syntax and re.search on the layer name (the weight name without '.weight').",
    ]
    return "\n".join(lines)


def heuristic_reason(fmt: str, shape: tuple[int, int], opts: dict) -> str | None:
    """Why ``--heur`` keeps a layer of ``shape`` out of format ``fmt`` (None: quantize it)."""
    m, n = shape
    if min(m, n) < 16:
        return f"heur: {m}x{n} has a dimension below 16"
    if m * n < 16384:
        return f"heur: {m}x{n} is tiny ({m * n} weights)"
    if max(m, n) / min(m, n) > 32:
        return f"heur: {m}x{n} aspect ratio {max(m, n) / min(m, n):.0f} > 32"
    from .formats import get_codec

    return get_codec(fmt).heuristic_reason((m, n), opts)
