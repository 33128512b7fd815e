"""Loader nodes for quantized and mixed files (BNB 4-bit + FP8/INT8, MXFP8, NVFP4, ...), and the
"Quantization Info (HybridQuant)" node.

Files are resolved as ComfyUI's own loaders resolve them (``folder_paths.get_full_path``: the names
ComfyUI lists, symlinks followed), then handed to ComfyUI's loader with the HybridQuant ops set (see
``backend``). There is one ops class, so the loaders have no ops choice; a workflow saved with the old
``ops`` input still loads (ComfyUI drops inputs a node no longer declares).
"""

from __future__ import annotations

from ._api import SUFFIX, Combo, format_aliases, io, schema

CATEGORY = "HybridQuant"
INFO_FOLDERS = ("diffusion_models", "checkpoints", "text_encoders")


def _safetensors(folder: str) -> list[str]:
    import folder_paths

    return [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(".safetensors")]


def model_path(folder: str, name: str) -> str:
    """The file ComfyUI means by ``name`` in ``folder`` (a clear error naming the input otherwise)."""
    import folder_paths

    from .paths import PathRejected, check_name

    try:
        check_name(name)
    except PathRejected as e:
        raise ValueError(f"{folder}: {e}") from None
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"{name!r} is not in models/{folder} (refresh the page if you just added it)")
    return path


class LoadDiffusionModelHQ(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="HybridQuantLoadDiffusionModel",
            display_name="Load Diffusion Model" + SUFFIX,
            category=CATEGORY,
            search_aliases=["unet", "loader", *format_aliases()],
            description=("Loads a diffusion model from models/diffusion_models, including files quantized by "
                         "HybridQuant (bitsandbytes NF4/FP4, mixed NF4 + FP8/INT8, FP8/INT8 per row or block, "
                         "MXFP8, Hybrid MXFP8, NVFP4) that the stock loader cannot read. The panel shows the "
                         "file's formats and this machine's matmul path."),
            inputs=[Combo("unet_name", options=_safetensors("diffusion_models"),
                                   tooltip="The .safetensors file in models/diffusion_models (or models/unet).")],
            outputs=[io.Model.Output(tooltip="The diffusion model, layers run by the HybridQuant ops.")],
        )

    @classmethod
    def execute(cls, unet_name) -> io.NodeOutput:
        from .backend import load_diffusion_model

        model, _ = load_diffusion_model(model_path("diffusion_models", unet_name))
        return io.NodeOutput(model)


class LoadCheckpointHQ(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="HybridQuantLoadCheckpoint",
            display_name="Load Checkpoint" + SUFFIX,
            category=CATEGORY,
            search_aliases=["checkpoint", "loader", *format_aliases()],
            description=("Loads a full checkpoint (diffusion model, text encoders, VAE) from models/checkpoints, "
                         "including quantized and mixed files made by HybridQuant; text encoders use the same ops."),
            inputs=[Combo("ckpt_name", options=_safetensors("checkpoints"),
                                   tooltip="The .safetensors checkpoint in models/checkpoints.")],
            outputs=[
                io.Model.Output(tooltip="The diffusion model."),
                io.Clip.Output(tooltip="The text encoder(s) of the checkpoint (None if it has none)."),
                io.Vae.Output(tooltip="The VAE of the checkpoint (None if it has none)."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name) -> io.NodeOutput:
        import folder_paths

        from .backend import load_checkpoint

        model, clip, vae, _ = load_checkpoint(model_path("checkpoints", ckpt_name), "auto",
                                              folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(model, clip, vae)


class LoadCLIPHQ(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from .backend import clip_types

        return schema(
            node_id="HybridQuantLoadCLIP",
            display_name="Load CLIP" + SUFFIX,
            category=CATEGORY,
            search_aliases=["text encoder", "t5", "loader", *format_aliases()],
            description=("Loads a text encoder from models/text_encoders, including text encoders quantized "
                         "by HybridQuant (bitsandbytes 4-bit, mixed, FP8/INT8 variants)."),
            inputs=[
                Combo("clip_name", options=_safetensors("text_encoders"),
                               tooltip="The .safetensors text encoder in models/text_encoders (or models/clip)."),
                Combo("type", options=clip_types(), default="stable_diffusion",
                               tooltip="Which model family the text encoder is for (as in the stock Load CLIP)."),
            ],
            outputs=[io.Clip.Output(tooltip="The text encoder, layers run by the HybridQuant ops.")],
        )

    @classmethod
    def execute(cls, clip_name, type="stable_diffusion") -> io.NodeOutput:
        import folder_paths

        from .backend import load_clip

        clip, _ = load_clip([model_path("text_encoders", clip_name)], type, "auto",
                            folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(clip)


def info_options() -> list[str]:
    import folder_paths

    from .paths import model_folders

    folders = [f for f in INFO_FOLDERS if f in model_folders(folder_paths)]
    return [f"{f}/{n}" for f in folders for n in _safetensors(f)]


def info_payload(file: str) -> dict:
    """The Info node's data for ``folder/name`` (what the panel and the text show)."""
    from ..ops.capabilities import core_quant_algos
    from . import capabilities_view
    from .fileinfo import file_summary

    folder, _, name = file.partition("/")
    if folder not in INFO_FOLDERS:
        raise ValueError(f"file: {file!r} is not in {', '.join(INFO_FOLDERS)}")
    summary = file_summary(model_path(folder, name), core_quant_algos(), display_name=name)
    summary["folder"], summary["name"] = folder, name
    summary["fast_path"] = capabilities_view.fast_path_for_formats(summary["formats"], summary["quantized_formats"])
    return summary


class QuantizationInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="HybridQuantInfo",
            display_name="Quantization Info" + SUFFIX,
            category=CATEGORY,
            search_aliases=["inspect", "layers", "info", *format_aliases()],
            description=("Shows a model file's layers (name, format, shape, size), its formats, whether this "
                         "ComfyUI's stock loaders read it and the matmul path here; read from the file's header. "
                         "Use the layer names to write Quantize Model's custom_layers regex."),
            inputs=[Combo("file", options=info_options(),
                                   tooltip="A .safetensors file in diffusion_models, checkpoints or text_encoders.")],
            outputs=[io.String.Output(display_name="info", tooltip="The same per-layer table, as text.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        from ..converter.errors import ConverterError
        from ..converter.formats import FormatError
        from .fileinfo import format_summary_text

        try:
            payload = info_payload(file)
        except (ConverterError, FormatError) as e:
            raise ValueError(str(e).replace(model_path(*file.split("/", 1)), file)) from None
        text = format_summary_text(payload)
        return io.NodeOutput(text, ui={"text": [text], "hybridquant_info": [payload]})
