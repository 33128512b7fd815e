"""Loader nodes for quantized and mixed files (BNB 4-bit + FP8/INT8, MXFP8, NVFP4, ...).

Each loader reads the file, lets ``ops.choose_ops`` pick ``HybridBNB4bitOps`` or ``HybridMXFP8Ops``
from its keys and header (the ``ops`` input overrides), and hands the prepared state dict to
ComfyUI's own loader with ``custom_operations`` set (see ``backend``). Only ``.safetensors`` files are
listed: quantized files are always safetensors, and the web summary reads their headers.
"""

from __future__ import annotations

from ._api import io
from .backend import OPS_CHOICES

CATEGORY = "HybridQuant"
OPS_TOOLTIP = ("Which HybridQuant ops class loads the layers. 'auto' picks from the file: "
               "HybridBNB4bitOps when it has bitsandbytes 4-bit layers (mixed FP8/INT8 layers "
               "included), HybridMXFP8Ops otherwise.")


def _safetensors(folder: str) -> list[str]:
    import folder_paths

    return [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(".safetensors")]


def _path(folder: str, name: str) -> str:
    import folder_paths

    from .paths import resolve_model_file

    return resolve_model_file(folder_paths, folder, name)


class LoadDiffusionModelHQ(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HybridQuantLoadDiffusionModel",
            display_name="Load Diffusion Model (HybridQuant)",
            category=CATEGORY,
            description=("Loads a diffusion model from models/diffusion_models, including files quantized "
                         "by HybridQuant (BNB 4-bit, mixed BNB + FP8/INT8, FP8/INT8 row/blockwise, MXFP8, "
                         "Hybrid MXFP8, NVFP4) that the stock loader cannot read."),
            inputs=[
                io.Combo.Input("unet_name", options=_safetensors("diffusion_models"),
                               tooltip="The .safetensors file in models/diffusion_models (or models/unet)."),
                io.Combo.Input("ops", options=list(OPS_CHOICES), default="auto", tooltip=OPS_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="The diffusion model, layers run by the HybridQuant ops.")],
        )

    @classmethod
    def execute(cls, unet_name, ops="auto") -> io.NodeOutput:
        from .backend import load_diffusion_model

        model, _ = load_diffusion_model(_path("diffusion_models", unet_name), ops)
        return io.NodeOutput(model)


class LoadCheckpointHQ(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HybridQuantLoadCheckpoint",
            display_name="Load Checkpoint (HybridQuant)",
            category=CATEGORY,
            description=("Loads a full checkpoint (diffusion model, text encoders, VAE) from models/checkpoints, "
                         "including quantized and mixed files made by HybridQuant; text encoders use the same ops."),
            inputs=[
                io.Combo.Input("ckpt_name", options=_safetensors("checkpoints"),
                               tooltip="The .safetensors checkpoint in models/checkpoints."),
                io.Combo.Input("ops", options=list(OPS_CHOICES), default="auto", tooltip=OPS_TOOLTIP),
            ],
            outputs=[
                io.Model.Output(tooltip="The diffusion model."),
                io.Clip.Output(tooltip="The text encoder(s) of the checkpoint (None if it has none)."),
                io.Vae.Output(tooltip="The VAE of the checkpoint (None if it has none)."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name, ops="auto") -> io.NodeOutput:
        import folder_paths

        from .backend import load_checkpoint

        model, clip, vae, _ = load_checkpoint(_path("checkpoints", ckpt_name), ops,
                                              folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(model, clip, vae)


class LoadCLIPHQ(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from .backend import clip_types

        return io.Schema(
            node_id="HybridQuantLoadCLIP",
            display_name="Load CLIP (HybridQuant)",
            category=CATEGORY,
            description=("Loads a text encoder from models/text_encoders, including text encoders quantized "
                         "by HybridQuant (BNB 4-bit, mixed, FP8/INT8 variants)."),
            inputs=[
                io.Combo.Input("clip_name", options=_safetensors("text_encoders"),
                               tooltip="The .safetensors text encoder in models/text_encoders (or models/clip)."),
                io.Combo.Input("type", options=clip_types(), default="stable_diffusion",
                               tooltip="Which model family the text encoder is for (as in the stock Load CLIP)."),
                io.Combo.Input("ops", options=list(OPS_CHOICES), default="auto", tooltip=OPS_TOOLTIP),
            ],
            outputs=[io.Clip.Output(tooltip="The text encoder, layers run by the HybridQuant ops.")],
        )

    @classmethod
    def execute(cls, clip_name, type="stable_diffusion", ops="auto") -> io.NodeOutput:
        import folder_paths

        from .backend import load_clip

        clip, _ = load_clip([_path("text_encoders", clip_name)], type, ops,
                            folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(clip)


class QuantizationInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        from .paths import model_folders

        folders = [f for f in ("diffusion_models", "checkpoints", "text_encoders")
                   if f in model_folders(folder_paths)]
        options = [f"{f}/{n}" for f in folders for n in _safetensors(f)]
        return io.Schema(
            node_id="HybridQuantInfo",
            display_name="Quantization Info",
            category=CATEGORY,
            description="Lists the per-layer formats and sizes of a model file, read from its safetensors header only.",
            inputs=[io.Combo.Input("file", options=options,
                                   tooltip="A .safetensors file in diffusion_models, checkpoints or text_encoders.")],
            outputs=[io.String.Output(display_name="info", tooltip="Per-layer formats and sizes, as text.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        from .fileinfo import file_summary, format_summary_text

        folder, _, name = file.partition("/")
        text = format_summary_text(file_summary(_path(folder, name)))
        return io.NodeOutput(text, ui={"text": [text]})
