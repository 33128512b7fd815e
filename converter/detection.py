"""Layers whose shapes ComfyUI's model detection reads: they must keep their true shape on disk.

Stock ComfyUI infers a model's config from weight shapes (``comfy/model_detection.py``
``detect_unet_config`` for diffusion models, ``comfy/sd.py`` ``detect_te_model`` and the
``text_encoders/*`` detectors for text encoders). A packed or padded weight (NVFP4, int5/int6,
bitsandbytes 4-bit, padded blockwise layouts) reports a different shape, so the detected config is
wrong and the stock loader builds the wrong model: an NVFP4 SD3 file whose ``y_embedder.mlp.0`` is
packed crashes stock 0.29/0.33 with "mat1 and mat2 shapes cannot be multiplied (1x2048 and 1024x256)".

The planner consults :func:`detection_reason`: a listed layer is never written in a format whose
stored ``weight`` shape differs from the logical one; it stays in high precision instead (8-bit
formats that store ``[M, N]`` as is are allowed). The table lists only 2-D weights (Linear layers:
the only ones the converter quantizes); conv weights and 1-D tensors detection also reads are never
quantized. Key presence checks (``... in state_dict_keys``) need no entry: names do not change.

Derived by reading ``model_detection.py`` / ``sd.py`` of ComfyUI 0.3.75 (CI's tree) and 0.33.0
(yzkee/ComfyUI master 783545f); "0.33" marks reads only the newer core has. Patterns anchor on a
dotted component so that prefixed files (``model.diffusion_model.``, ``text_encoders.t5xxl.transformer.``)
match too. This module does not import ComfyUI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DetectionRead:
    layer: str  # layer name (weight name without ".weight") after ComfyUI's key prefix
    source: str  # where ComfyUI reads its shape, and what it infers


def _rx(layer: str) -> str:
    return r"(^|\.)" + re.escape(layer) + "$"


_MD = "model_detection.detect_unet_config"
DETECTION_SAFE = "detection-safe:"  # the start of a plan's reason for a layer this module kept

# architecture -> the 2-D weights whose shapes its detection reads
DETECTION_READS: dict[str, tuple[DetectionRead, ...]] = {
    "sd3": (  # "#mmdit model" branch
        DetectionRead("final_layer.linear", f"{_MD} (mmdit): out_channels = shape[0] // patch**2"),
        DetectionRead("y_embedder.mlp.0", f"{_MD} (mmdit): adm_in_channels = shape[1]"),
        DetectionRead("context_embedder", f"{_MD} (mmdit): context_embedder in/out features = shape"),
    ),
    "flux": (  # "#Flux, Chroma or Chroma Radiance" branch; flux2 and chroma share it
        DetectionRead("img_in", f"{_MD} (flux/flux2/chroma): in_channels = shape[1] // patch**2, hidden_size = shape[0]"),
        DetectionRead("txt_in", f"{_MD} (flux/flux2/chroma): context_in_dim = shape[1], hidden_size = shape[0]"),
        DetectionRead("vector_in.in_layer", f"{_MD} (flux): vec_in_dim = shape[1]"),
    ),
    "hunyuan_video": (  # "#Hunyuan Video" branch (1.0 and 1.5)
        DetectionRead("final_layer.linear", f"{_MD} (hunyuan_video): out_channels = shape[0] // prod(patch)"),
        DetectionRead("txt_in.input_embedder", f"{_MD} (hunyuan_video): context_in_dim = shape[1]"),
        DetectionRead("vision_in.proj.0", f"{_MD} (hunyuan_video 1.5): vision_in_dim = shape[0]"),
    ),
    "ltxv": (  # "#Lightricks ltxv" branch
        DetectionRead("transformer_blocks.0.attn2.to_k",
                      f"{_MD} (ltxv/ltxav): attention_head_dim = shape[0] // 32, cross_attention_dim = shape[1]"),
    ),
    "lumina2": (  # "# Lumina 2" branch: Lumina 2, NewBie, Z-Image
        DetectionRead("cap_embedder.1", f"{_MD} (lumina2/zimage): dim = shape[0], cap_feat_dim = shape[1]"),
        DetectionRead("clip_text_pooled_proj.0", f"{_MD} (lumina2 NewBie, 0.33): clip_text_dim = shape[0]"),
        DetectionRead("siglip_embedder.0", f"{_MD} (zimage omni, 0.33): siglip_feat_dim = shape[0]"),
        DetectionRead("x_embedder", f"{_MD} (zimage_pixel, 0.33): patch_size from shape[1]"),
        DetectionRead("dec_net.final_layer.linear", f"{_MD} (zimage_pixel, 0.33): decoder channels = shape[0]"),
        DetectionRead("dec_net.input_embedder.embedder.0", f"{_MD} (zimage_pixel, 0.33): decoder_max_freqs from shape[1]"),
    ),
    "wan": (  # "# Wan 2.1" branch (2.1, 2.2, VACE, camera, ...)
        DetectionRead("head.head", f"{_MD} (wan2.1): out_dim = shape[0] // 4"),
        DetectionRead("blocks.0.ffn.0", f"{_MD} (wan2.1): ffn_dim = shape[0]"),
    ),
    "qwen_image": (  # "# Qwen Image" branch and 0.33's "# Lens" branch
        DetectionRead("img_in", f"{_MD} (qwen_image): in_channels = shape[1]; (lens, 0.33): heads = shape[0] // 64"),
        DetectionRead("proj_out", f"{_MD} (lens / mage_flow, 0.33): out_channels = shape[0] // 4"),
    ),
    "t5": (  # text encoders: sd.detect_te_model
        DetectionRead("encoder.block.23.layer.1.DenseReluDense.wi_1",
                      "sd.detect_te_model: T5-XXL vs T5-XL by shape[-1] (4096 / 2048, 0.3.75), "
                      "vs Pile-T5 by shape[0] (10240 / 5120, 0.33)"),
        DetectionRead("encoder.block.0.layer.0.SelfAttention.k", "sd.detect_te_model: ByT5-small-glyph by shape[0] == 384"),
    ),
    "qwen3vl": (
        DetectionRead("model.visual.merger.linear_fc2", "sd.detect_te_model (0.33): Qwen3-VL 4B vs 8B by shape[0]"),
    ),
    "ltxv_te": (  # text_encoders/lt.py sd_detect (0.33): the Gemma text projection of LTX-2
        DetectionRead("text_embedding_projection.video_aggregate_embed", "text_encoders.lt.sd_detect (0.33): video_projection_dim = shape[0]"),
        DetectionRead("text_embedding_projection.audio_aggregate_embed", "text_encoders.lt.sd_detect (0.33): audio_projection_dim = shape[0]"),
        DetectionRead("text_embedding_projection", "text_encoders.lt.sd_detect (0.33): video_projection_dim = shape[0]"),
        DetectionRead("text_embedding_projection.aggregate_embed", "text_encoders.lt.sd_detect (0.33): video_projection_dim = shape[0]"),
    ),
}

# One regex per read (all architectures at once: a layer of another architecture matching a pattern
# only stays unpacked needlessly, and a file's architecture is not known before ComfyUI detects it).
_COMPILED: tuple[tuple[re.Pattern, str, DetectionRead], ...] = tuple(
    (re.compile(_rx(r.layer)), arch, r) for arch, reads in DETECTION_READS.items() for r in reads)


def detection_read(layer: str) -> tuple[str, DetectionRead] | None:
    """(architecture, read) when ComfyUI's detection reads the shape of ``layer``'s weight."""
    for rx, arch, r in _COMPILED:
        if rx.search(layer):
            return arch, r
    return None


def stored_weight_shape(fmt: str, shape: tuple[int, int], opts: dict) -> tuple[int, ...] | None:
    """The shape format ``fmt`` stores a logical ``shape`` weight as (None: it stores no ``weight``)."""
    from . import transforms
    from .formats import get_codec

    # the same options the writer passes (convert.codec_opts): transforms leave the weight's shape alone
    drop = ("full_precision_matrix_mult",) + tuple(transforms.KEYS)
    codec_opts = {k: v for k, v in opts.items() if k not in drop}
    spec = get_codec(fmt).output_specs(tuple(shape), **codec_opts).get("weight")
    return None if spec is None else tuple(spec.shape)


def detection_reason(layer: str, fmt: str, shape: tuple[int, int], opts: dict) -> str | None:
    """Why ``layer`` must not be written as ``fmt`` (None: it may): detection reads its shape and the
    format stores another one."""
    hit = detection_read(layer)
    if hit is None:
        return None
    stored = stored_weight_shape(fmt, shape, opts)
    if stored == tuple(shape):
        return None
    arch, r = hit
    got = "no weight tensor" if stored is None else "x".join(map(str, stored))
    return (f"{DETECTION_SAFE} ComfyUI reads this shape ({r.source}); {fmt} stores {got} for "
            f"{shape[0]}x{shape[1]}: kept in high precision")
