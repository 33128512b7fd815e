"""The "Quantize Model" node: quantizes a MODEL's diffusion model in memory with the converter.

Flow: take the (patched) weights of the input MODEL -> ``converter.convert.quantize_state_dict`` with
the chosen formats -> optionally write the result atomically to models/diffusion_models under a
filename prefix (never over an existing file: the next free ``_NNNNN`` number is taken) -> build the
output MODEL from the quantized state dict through the same path our loaders use (``backend``), so
what you sample here is what the saved file gives when loaded again.

Progress: a ``comfy.utils.ProgressBar`` per layer (the UI's node progress; its hook also raises on
Cancel) plus ``hybridquant.progress`` / ``hybridquant.done`` websocket messages (layer name, index,
ETA, final summary) for the web extension. Cancel: the converter's ``cancel`` callback polls
``comfy.model_management.processing_interrupted()``; nothing is written before the whole model is
quantized and the write itself is atomic, so a cancelled run leaves no file.

Not redoing work: ComfyUI already reuses a node's outputs when its inputs are unchanged. On top of
that we keep the last result keyed by (options, content fingerprint of the patched weights) in
memory, so a re-run that ComfyUI's cache misses (its cache was evicted by another workflow, the
loader ran again, ``--cache-none``) does not quantize again.
``fingerprint_inputs`` makes ComfyUI re-run the node when the file it saved has been deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time

from ._api import io
from . import quantize_options as qo

log = logging.getLogger("HybridQuant")
CATEGORY = "HybridQuant"

_lock = threading.Lock()
_RUNS = {"count": 0}  # real quantizations in this process (reported in the summary)
_LAST: dict = {}  # options key + content fingerprint -> {"result": (MODEL, summary), "file": path}
_SAVED: dict = {}  # options key -> last saved absolute path (for fingerprint_inputs)


def quantization_runs() -> int:
    return _RUNS["count"]


def _send(event: str, data: dict) -> None:
    try:
        from server import PromptServer

        srv = PromptServer.instance
        srv.send_sync(event, data, srv.client_id)
    except Exception:  # no server (in-process tests) or no client connected: progress is optional
        pass


def _prompt_id():
    try:
        from comfy_execution.utils import get_executing_context

        ctx = get_executing_context()
        return getattr(ctx, "prompt_id", None)
    except Exception:
        return None


def _diffusion_state_dict(model) -> dict:
    """The input MODEL's diffusion-model weights with its patches (LoRAs...) applied, on CPU."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_patch_weights=True)
    sd = model.model.diffusion_model.state_dict()
    return {k: v.detach().to("cpu") for k, v in sd.items()}


def _target_dir() -> str:
    import folder_paths

    paths = folder_paths.get_folder_paths("diffusion_models")
    for p in paths:
        if os.path.basename(os.path.normpath(p)) == "diffusion_models":
            return p
    return paths[-1]


def _save(new_sd, header_metadata, prefix: str) -> str:
    """Write atomically to <diffusion_models>/<prefix>_NNNNN.safetensors, first free number."""
    from ..converter.errors import OutputFileError
    from ..converter.safetensors_writer import write_safetensors

    base = _target_dir()
    rel = qo.check_prefix(prefix)
    full_prefix = os.path.join(base, *rel.split("/"))
    os.makedirs(os.path.dirname(full_prefix), exist_ok=True)
    meta = {str(k): str(v) for k, v in (header_metadata or {}).items()}
    for n in range(1, 100000):
        path = f"{full_prefix}_{n:05d}.safetensors"
        if os.path.exists(path):
            continue
        try:
            # write_safetensors refuses an existing target (overwrite=False) even if one appears
            # between our check and its rename: then we take the next number.
            return write_safetensors(path, new_sd, meta, overwrite=False)
        except OutputFileError:
            if os.path.exists(path):
                continue
            raise
    raise RuntimeError(f"no free file name for prefix {prefix!r}")


class _Progress:
    """Per-layer progress: ProgressBar (UI + Cancel) and our websocket messages with an ETA."""

    def __init__(self, node_id, n_tensors: int):
        import comfy.utils

        self.node_id = node_id
        self.n_tensors = n_tensors
        self.calls = 0
        self.prompt_id = _prompt_id()
        self.t0 = time.monotonic()
        self.bar = None
        self._pb = comfy.utils.ProgressBar
        self.last_sent = 0.0

    def __call__(self, done: int, total: int, layer: str | None = None, **_):
        # The converter reports bytes done/total (ETA by bytes: big layers take longer) after each tensor.
        self.calls += 1
        if self.bar is None:
            self.bar = self._pb(total, node_id=self.node_id)
        self.bar.update_absolute(done, total)
        now = time.monotonic()
        elapsed = now - self.t0
        # Websocket messages at most every 0.25 s (a 1000-layer model must not flood the socket);
        # always the last one.
        if done < total and now - self.last_sent < 0.25:
            return
        self.last_sent = now
        eta = elapsed / done * (total - done) if done else None
        _send("hybridquant.progress", {"node": self.node_id, "prompt_id": self.prompt_id, "layer": layer,
                                       "index": self.calls, "count": self.n_tensors,
                                       "bytes_done": done, "bytes_total": total, "elapsed_s": round(elapsed, 2),
                                       "eta_s": None if eta is None else round(eta, 1)})


def _raise_if_interrupted():
    import comfy.model_management as mm

    if mm.processing_interrupted():
        mm.throw_exception_if_processing_interrupted()


def _cancelled() -> bool:
    import comfy.model_management as mm

    return mm.processing_interrupted()


def content_fingerprint(sd: dict) -> str:
    """Fingerprint of a state dict's CONTENT: names, dtypes, shapes, a float64 sum over every element
    and a strided sample of the raw bytes of each tensor. Cheap next to quantizing (one read pass) and
    independent of object identity, so a MODEL re-loaded by an upstream node still matches."""
    import torch

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k]
        flat = t.reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if flat.numel():
            h.update(repr(float(torch.sum(flat, dtype=torch.float64))).encode())
            step = max(1, flat.numel() // 4096)
            h.update(flat[::step][:4096].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def quantize_model(model, settings: dict, node_id=None):
    """Quantize ``model``'s diffusion model; returns (new MODEL, summary str, saved path or None, reused)."""
    from .backend import diffusion_model_from_state_dict, pick_ops

    calib_path = _calibration_path(settings["calibration"])
    calib_state = ""
    if calib_path:
        st = os.stat(calib_path)
        calib_state = f"|{st.st_mtime_ns}:{st.st_size}"
    sd = _diffusion_state_dict(model)
    key = qo.options_key(settings) + calib_state + "|" + content_fingerprint(sd)
    with _lock:
        hit = _LAST.get(key)
    if hit is not None:
        saved = hit["file"]
        if not settings["save"] or (saved and os.path.isfile(saved)):
            new_model, summary = hit["result"]
            summary = summary + "\n(reused the earlier result for the same weights and options: not quantized again)"
            _send("hybridquant.done", {"node": node_id, "prompt_id": _prompt_id(), "summary": summary,
                                       "file": saved, "reused": True})
            return new_model, summary, saved, True

    from ..converter.convert import quantize_state_dict

    options = qo.build_options(settings)
    t0 = time.monotonic()
    progress = _Progress(node_id, len(sd))
    try:
        new_sd, header_metadata, report = quantize_state_dict(sd, options, progress=progress, cancel=_cancelled,
                                                              calibration=calib_path)
    except BaseException as e:
        if _cancelled() or type(e).__name__ in ("Cancelled", "InterruptProcessingException"):
            _send("hybridquant.done", {"node": node_id, "prompt_id": progress.prompt_id, "cancelled": True})
            _raise_if_interrupted()
            import comfy.model_management as mm

            raise mm.InterruptProcessingException() from e
        raise
    del sd
    _raise_if_interrupted()  # Cancel pressed after the last layer: still no file
    header_metadata = dict(header_metadata or {})
    header_metadata.setdefault("hybridquant.source", "Quantize Model node")
    header_metadata["hybridquant.options"] = json.dumps(qo.public_settings(settings), sort_keys=True)
    saved = _save(new_sd, header_metadata, settings["filename_prefix"]) if settings["save"] else None
    ops_class = pick_ops(new_sd.keys(), header_metadata)
    new_model = diffusion_model_from_state_dict(new_sd, header_metadata, ops_class, "Quantize Model output")
    _carry_patches(model, new_model)
    with _lock:
        _RUNS["count"] += 1
        run = _RUNS["count"]
    summary = qo.summary_text(report, settings, saved, time.monotonic() - t0, run,
                              getattr(ops_class, "__name__", str(ops_class)))
    with _lock:
        _LAST.clear()  # keep one result: a quantized model is large
        _LAST[key] = {"result": (new_model, summary), "file": saved}
        if saved:
            _SAVED[qo.options_key(settings)] = saved
    log.info("HybridQuant: %s", summary.splitlines()[0])
    _send("hybridquant.done", {"node": node_id, "prompt_id": progress.prompt_id, "summary": summary,
                               "file": saved, "reused": False})
    return new_model, summary, saved, False


def _carry_patches(src, dst) -> None:
    """Keep the input MODEL's sampling setup (model_options: cfg functions, wrappers; object patches
    such as a ModelSamplingSD3 shift). Weight patches are not carried: they are baked into the
    quantized weights already."""
    clone = src.clone()
    dst.model_options = clone.model_options
    for name, obj in clone.object_patches.items():
        dst.add_object_patch(name, obj)


def _calibration_choices() -> list[str]:
    try:
        from .calibration import calibration_files
    except ImportError:  # the calibration node module is optional
        return ["none"]
    return ["none"] + list(calibration_files())


def _calibration_path(name: str):
    """Absolute path of a models/calibration file (same folder rules as every other input)."""
    if not name or name == "none":
        return None
    import folder_paths

    from .calibration import FOLDER, calibration_dir
    from .paths import resolve_model_file

    calibration_dir()  # registers the folder with folder_paths
    return resolve_model_file(folder_paths, FOLDER, name)


class QuantizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HybridQuantQuantizeModel",
            display_name="Quantize Model",
            category=CATEGORY,
            description=("Quantizes the diffusion model of a MODEL layer by layer (FP8, INT8, MXFP8, NVFP4, "
                         "bitsandbytes 4-bit; regex-chosen layers in a second format), optionally saves it to "
                         "models/diffusion_models, and outputs the quantized model ready to sample."),
            inputs=[
                io.Model.Input("model", tooltip="The model whose diffusion model is quantized (its LoRAs/patches are baked in)."),
                io.Combo.Input("format", options=list(qo.PRIMARY_CHOICES), default="bnb_nf4",
                               tooltip="Format of every quantized layer not matched by custom_layers."),
                io.Combo.Input("preset", options=qo.preset_choices(), default="none",
                               tooltip="Model preset: keeps that architecture's sensitive layers (input/output "
                                       "projections, embedders) in high precision."),
                io.String.Input("custom_layers", default="", tooltip=(
                    "Optional regex (re.search on layer names like 'joint_blocks.0.x_block.attn.qkv'): matching layers "
                    "get custom_format instead. Empty: none.")),
                io.Combo.Input("custom_format", options=list(qo.CUSTOM_CHOICES), default="fp8 tensorwise",
                               tooltip="Format of the layers matched by custom_layers (e.g. FP8 inside a BNB 4-bit model)."),
                io.Combo.Input("rounding", options=qo.rounding_choices(), default=qo.default_rounding(),
                               tooltip=qo.rounding_help()),
                io.Boolean.Input("save", default=False,
                                 tooltip="Also write the quantized model to models/diffusion_models (never overwrites: "
                                         "the next free number is used)."),
                io.String.Input("filename_prefix", default="hybridquant/quantized",
                                tooltip="File name prefix under models/diffusion_models; _00001.safetensors etc. is appended."),
                io.Combo.Input("calibration", options=_calibration_choices(), default="none", optional=True,
                               tooltip="Calibration statistics from models/calibration (recorded by 'Collect "
                                       "Calibration (HybridQuant)'); needed by rounding 'gptq'."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The quantized model, run by the HybridQuant ops."),
                io.String.Output(display_name="summary", tooltip="What was quantized to what, sizes, time, saved file."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, **kw):
        try:
            qo.validate_settings(kw)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, **kw):
        # Widgets are already part of ComfyUI's cache key; what it cannot see is whether the file we
        # saved last time for these options still exists. If it was deleted, re-run.
        # A calibration file grows while more sampling runs are recorded: its mtime/size count too.
        calib = ""
        try:
            path = _calibration_path(kw.get("calibration") or "none")
            if path:
                st = os.stat(path)
                calib = f"{st.st_mtime_ns}:{st.st_size}"
        except Exception:
            calib = "?"
        if not kw.get("save"):
            return calib
        try:
            key = qo.options_key(qo.settings_from_inputs(kw))
        except Exception:
            return calib
        saved = _SAVED.get(key)
        return f"{calib}|{saved}:{bool(saved and os.path.isfile(saved))}"

    @classmethod
    def execute(cls, model, format, preset, custom_layers, custom_format, rounding, save,
                filename_prefix, calibration="none") -> io.NodeOutput:
        settings = qo.settings_from_inputs(dict(format=format, preset=preset, custom_layers=custom_layers,
                                                custom_format=custom_format, rounding=rounding, save=save,
                                                filename_prefix=filename_prefix, calibration=calibration))
        node_id = getattr(cls.hidden, "unique_id", None) if getattr(cls, "hidden", None) is not None else None
        new_model, summary, saved, reused = quantize_model(model, settings, node_id)
        return io.NodeOutput(new_model, summary, ui={"text": [summary]})
