"""The "Quantize Model (HybridQuant)" node: its inputs, checks and cache key (the run is ``quantize_run``).

Checks: ComfyUI's own (combo values -- see ``_api.Combo`` --, types) run for every input;
``validate_inputs`` takes only ``custom_layers`` (the one input ComfyUI cannot check: a regex), so its
error is attributed to that input alone. ComfyUI attaches a custom check's message to EVERY input the check takes, so checks that
need several inputs (a filename prefix only matters with save on; gptq needs a calibration file) run
at the start of the node's run, before any weight is read, and name their input.
"""

from __future__ import annotations

import os

from . import quantize_options as qo
from ._api import SUFFIX, Combo, format_aliases, io, schema

CATEGORY = "HybridQuant"


def _calibration_choices() -> list[str]:
    try:
        from .calibration import calibration_files
    except ImportError:  # the calibration node module is optional
        return ["none"]
    return ["none"] + list(calibration_files())


class QuantizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        primary = [c.text for c in qo.primary_choices()]
        custom = [c.text for c in qo.custom_choices()]
        return schema(
            node_id="HybridQuantQuantizeModel",
            display_name="Quantize Model" + SUFFIX,
            category=CATEGORY,
            search_aliases=["quantize", "quantise", "compress", *format_aliases()],
            description=("Quantizes the diffusion model of a MODEL layer by layer (FP8, INT8, MXFP8, Hybrid MXFP8, "
                         "NVFP4, bitsandbytes NF4/FP4; regex-chosen layers in a second format), optionally saves it "
                         "to models/diffusion_models, and outputs the quantized model ready to sample. The panel "
                         "previews which layer becomes what before you run it."),
            inputs=[
                io.Model.Input("model", tooltip="The model whose diffusion model is quantized (its LoRAs/patches "
                                                "are baked in). Connect a loader of the bf16/fp16 model."),
                Combo("format", options=primary, default=qo.device_default().text, tooltip=qo.options_help()),
                Combo("preset", options=qo.preset_choices(), default="none", tooltip=qo.preset_help()),
                io.String.Input("custom_layers", default="", tooltip=(
                    "Optional regex (searched in layer names such as 'joint_blocks.0.x_block.attn.qkv'; the "
                    "Quantization Info node and this node's preview list them): matching layers get "
                    "custom_format. Empty: none.")),
                Combo("custom_format", options=custom, default=qo.default_custom().text,
                               tooltip=qo.options_help(custom=True)),
                Combo("rounding", options=qo.rounding_choices(), default=qo.default_rounding(),
                               tooltip=qo.rounding_help()),
                io.Boolean.Input("save", default=False,
                                 tooltip="Also write the quantized model to models/diffusion_models (never "
                                         "overwrites: the next free number is used)."),
                io.String.Input("filename_prefix", default=qo.DEFAULT_PREFIX,
                                tooltip="File name under models/diffusion_models; _00001.safetensors etc. is "
                                        "appended. Relative names only."),
                Combo("calibration", options=_calibration_choices(), default="none", optional=True,
                               tooltip="Calibration statistics from models/calibration (recorded by 'Collect "
                                       "Calibration (HybridQuant)'); needed by rounding 'gptq'."),
                # issue 14 (optional: workflows saved before them keep working with the defaults)
                io.String.Input("target_size", default="", optional=True, tooltip=qo.TARGET_SIZE_HELP),
                io.Int.Input("svd_rank", default=0, min=0, max=qo.MAX_SVD_RANK, optional=True,
                             tooltip=qo.SVD_RANK_HELP),
                Combo("rotate", options=qo.rotate_choices(), default="none", optional=True, tooltip=qo.ROTATE_HELP),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The quantized model, run by the HybridQuant ops."),
                io.String.Output(display_name="summary", tooltip="What was quantized to what, sizes, errors, file."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, custom_layers=""):
        # None: the input is linked to another node (its value is known only at run time).
        if not isinstance(custom_layers, str):
            return True
        try:
            qo.check_regex(custom_layers.strip())
        except ValueError as e:
            # ComfyUI shows "custom_layers - <message>": the input's name is not repeated
            return str(e).removeprefix("custom_layers: ")
        return True

    @classmethod
    def fingerprint_inputs(cls, **kw):
        # Widgets are already part of ComfyUI's cache key; what it cannot see is whether the file we
        # saved for these options still exists, and whether the calibration file grew.
        from .quantize_run import calibration_path, saved_for

        calib = ""
        try:
            path = calibration_path(kw.get("calibration") or "none")
            if path:
                st = os.stat(path)
                calib = f"{st.st_mtime_ns}:{st.st_size}"
        except Exception:  # noqa: BLE001 - the run reports it
            calib = "?"
        if not kw.get("save"):
            return calib
        try:
            saved = saved_for(qo.settings_from_inputs(kw))
        except Exception:  # noqa: BLE001
            return calib
        return f"{calib}|{saved}:{bool(saved and os.path.isfile(saved))}"

    @classmethod
    def execute(cls, model, format, preset, custom_layers, custom_format, rounding, save,
                filename_prefix, calibration="none", target_size="", svd_rank=0, rotate="none") -> io.NodeOutput:
        from .quantize_run import quantize_model

        settings = qo.settings_from_inputs(dict(format=format, preset=preset, custom_layers=custom_layers,
                                                custom_format=custom_format, rounding=rounding, save=save,
                                                filename_prefix=filename_prefix, calibration=calibration,
                                                target_size=target_size, svd_rank=svd_rank, rotate=rotate))
        hidden = getattr(cls, "hidden", None)
        node_id = getattr(hidden, "unique_id", None) if hidden is not None else None
        prompt = getattr(hidden, "prompt", None) if hidden is not None else None
        new_model, summary, _, _ = quantize_model(model, settings, node_id, prompt)
        return io.NodeOutput(new_model, summary, ui={"text": [summary]})
