"""The run of "Quantize Model" (the node's schema is ``quantize.py``).

Flow: check the settings -> find what the input MODEL was loaded from (the upstream loader in the
prompt) -> reuse an earlier result when the source and options are the same -> otherwise take the
(patched) diffusion-model weights, plan them (a plan that quantizes nothing is an error that says why)
-> ``converter.quantize_state_dict`` -> optionally save atomically under models/diffusion_models
(never over an existing file) -> build the output MODEL through the loaders' own path (``backend``).

Not redoing work, without keeping models alive: results are held by WEAK reference (alive only while
ComfyUI's cache holds them); a saved file records the source key in its header, so a later run with
the same source and options loads that file instead of quantizing again. The source key is the
upstream loader's inputs plus the file's real path, size and mtime (no hashing of weights); only a
model that is not plainly loaded from a file (LoRAs merged in, another node in between) is
fingerprinted by content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import weakref

from . import quantize_options as qo
from . import quantize_summary as qs

log = logging.getLogger("HybridQuant")

_lock = threading.Lock()
_RESULTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key -> output MODEL
_SUMMARIES: dict[str, str] = {}  # key -> summary text (strings only)
_SAVED: dict[str, str] = {}  # key -> absolute path of the file saved for it
_RUNS = {"count": 0}  # real quantizations in this process (tests read it; never shown to users)
SOURCE_KEY = "hybridquant.source_key"

# Loader nodes whose output MODEL is exactly a file's weights: class -> (file input, model folder)
FILE_LOADERS = {
    "UNETLoader": ("unet_name", "diffusion_models"),
    "HybridQuantLoadDiffusionModel": ("unet_name", "diffusion_models"),
    "CheckpointLoaderSimple": ("ckpt_name", "checkpoints"),
    "HybridQuantLoadCheckpoint": ("ckpt_name", "checkpoints"),
}


def quantization_runs() -> int:
    return _RUNS["count"]


# Errors the user sees are plain ValueErrors with a short message naming the input: ComfyUI shows an
# exception's full type name (module path included) next to the message, and a builtin is just "ValueError".
QuantizeError = ValueError


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

        return getattr(get_executing_context(), "prompt_id", None)
    except Exception:
        return None


# -- where the model came from --------------------------------------------------------------------
def source_key(model, prompt, node_id) -> str | None:
    """A key for the input MODEL's weights that costs no hashing: the upstream loader's inputs and
    its file's real path, size and mtime. None when the model is not plainly a file's weights."""
    if not prompt or node_id is None or getattr(model, "patches", None):
        return None
    link = (prompt.get(str(node_id), {}).get("inputs", {}) or {}).get("model")
    if not (isinstance(link, list) and len(link) == 2):
        return None
    up = prompt.get(str(link[0])) or {}
    loader = FILE_LOADERS.get(up.get("class_type"))
    if loader is None:
        return None
    inputs = up.get("inputs", {})
    name = inputs.get(loader[0])
    if not isinstance(name, str):
        return None
    try:
        import folder_paths

        path = folder_paths.get_full_path(loader[1], name)
        st = os.stat(path)
    except Exception:  # noqa: BLE001 - unknown file: fall back to the content fingerprint
        return None
    plain = {k: v for k, v in inputs.items() if not isinstance(v, list)}
    return json.dumps({"loader": up["class_type"], "inputs": plain, "file": os.path.realpath(path),
                       "size": st.st_size, "mtime_ns": st.st_mtime_ns}, sort_keys=True)


def content_fingerprint(sd: dict) -> str:
    """Fingerprint of a state dict's CONTENT (names, dtypes, shapes, a float64 sum and a strided byte
    sample per tensor): used only when the model is not plainly loaded from a file."""
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


def _diffusion_state_dict(model) -> dict:
    """The input MODEL's diffusion-model weights with its patches (LoRAs...) applied, on CPU."""
    import comfy.model_management as mm

    if getattr(model, "is_dynamic", lambda: False)():
        # Dynamic VRAM (ComfyUI 0.33): ModelPatcherDynamic refuses force_patch_weights (an assert); the
        # core's non-dynamic delegate (rebuilt through cached_patcher_init) patches like 0.3.75 does.
        model = model.get_non_dynamic_delegate()
    mm.load_models_gpu([model], force_patch_weights=True)
    sd = model.model.diffusion_model.state_dict()
    return {k: v.detach().to("cpu") for k, v in sd.items()}


def _already_quantized(model) -> int:
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if dm is None:
        return 0
    return sum(1 for m in dm.modules() if getattr(m, "hq_format", None))


# -- saving ---------------------------------------------------------------------------------------
def target_dir() -> str:
    import folder_paths

    paths = folder_paths.get_folder_paths("diffusion_models")
    for p in paths:
        if os.path.basename(os.path.normpath(p)) == "diffusion_models":
            return p
    return paths[0]


def display_name(path: str) -> str:
    """A saved file as the loaders list it (relative to its model folder), never an absolute path."""
    base = target_dir()
    try:
        rel = os.path.relpath(path, base)
    except ValueError:
        return os.path.basename(path)
    return os.path.basename(path) if rel.startswith("..") else rel.replace(os.sep, "/")


def _save(new_sd, header_metadata, prefix: str) -> str:
    """Write atomically to <diffusion_models>/<prefix>_NNNNN.safetensors, first free number."""
    from ..converter.errors import OutputFileError
    from ..converter.safetensors_writer import write_safetensors

    rel = qo.check_prefix(prefix)
    full_prefix = os.path.join(target_dir(), *rel.split("/"))
    os.makedirs(os.path.dirname(full_prefix), exist_ok=True)
    meta = {str(k): str(v) for k, v in (header_metadata or {}).items()}
    for n in range(1, 100000):
        path = f"{full_prefix}_{n:05d}.safetensors"
        if os.path.exists(path):
            continue
        try:
            # refuses an existing target even if one appears between the check and the rename
            return write_safetensors(path, new_sd, meta, overwrite=False)
        except OutputFileError:
            if os.path.exists(path):
                continue
            raise
    raise QuantizeError(f"filename_prefix {prefix!r}: no free file name left")


def _saved_matches(path: str | None, key: str) -> bool:
    if not path or not os.path.isfile(path):
        return False
    try:
        from ..converter.safetensors_io import read_header

        _, meta = read_header(path)
    except Exception:  # noqa: BLE001 - unreadable: quantize again
        return False
    return meta.get(SOURCE_KEY) == hashlib.sha256(key.encode()).hexdigest()


# -- progress -------------------------------------------------------------------------------------
class _Progress:
    """Progress in LAYERS (the unit of the summary) with an ETA by bytes (big layers take longer):
    ComfyUI's ProgressBar (node progress; its hook raises on Cancel) + our websocket messages."""

    def __init__(self, node_id, layers: set[str]):
        import comfy.utils

        self.node_id = node_id
        self.layers = layers
        self.count = len(layers)
        self.index = 0
        self.prompt_id = _prompt_id()
        self.t0 = time.monotonic()
        self.bar = comfy.utils.ProgressBar(max(1, self.count), node_id=node_id)
        self.last_sent = 0.0

    def __call__(self, done: int, total: int, name: str | None = None, **_):
        if name in self.layers:
            self.index += 1
            self.bar.update_absolute(self.index, max(1, self.count))
        now = time.monotonic()
        elapsed = now - self.t0
        if done < total and now - self.last_sent < 0.25:  # at most 4 messages a second, always the last
            return
        self.last_sent = now
        eta = elapsed / done * (total - done) if done else None
        layer = name[: -len(".weight")] if name and name.endswith(".weight") else name
        _send("hybridquant.progress", {"node": self.node_id, "prompt_id": self.prompt_id, "layer": layer,
                                       "index": self.index, "count": self.count,
                                       "fraction": done / total if total else 1.0,
                                       "elapsed_s": round(elapsed, 2), "eta_s": None if eta is None else round(eta, 1)})


def _cancelled() -> bool:
    import comfy.model_management as mm

    return mm.processing_interrupted()


def _interrupt():
    import comfy.model_management as mm

    return mm.InterruptProcessingException()


# -- the run --------------------------------------------------------------------------------------
def calibration_path(name: str):
    """Absolute path of a models/calibration file (same folder rules as every other input)."""
    if not name or name == "none":
        return None
    import folder_paths

    from .calibration import FOLDER, calibration_dir
    from .paths import PathRejected, resolve_model_file

    calibration_dir()  # registers the folder with folder_paths
    try:
        return resolve_model_file(folder_paths, FOLDER, name)
    except PathRejected as e:
        raise QuantizeError(f"calibration: {e}") from None


def _plan(sd, options):
    from ..converter.convert import plan_state_dict
    from ..converter.errors import ConverterError

    try:
        return plan_state_dict(sd, options)
    except ConverterError as e:
        raise QuantizeError(str(e)) from None


def quantize_model(model, settings: dict, node_id=None, prompt=None):
    """Quantize ``model``'s diffusion model; returns (new MODEL, summary text, saved path or None, reused)."""
    from .backend import diffusion_model_from_state_dict, load_diffusion_model, pick_ops, register_reload

    try:
        qo.validate_settings(settings)
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    calib_path = calibration_path(settings["calibration"])
    calib_state = ""
    if calib_path:
        st = os.stat(calib_path)
        calib_state = f"|{st.st_mtime_ns}:{st.st_size}"
    n_quant = _already_quantized(model)
    if n_quant:
        raise QuantizeError(f"the input MODEL is already quantized ({n_quant} layers were loaded from a quantized "
                            f"file): connect a loader of the original bf16/fp16 model instead")

    src = source_key(model, prompt, node_id)
    sd = None
    if src is None:
        sd = _diffusion_state_dict(model)
        src = content_fingerprint(sd)
    key = qo.options_key(settings) + calib_state + "|" + src
    with _lock:
        held = _RESULTS.get(key)
        summary = _SUMMARIES.get(key)
        saved = _SAVED.get(key)
    if held is not None and summary and (not settings["save"] or (saved and os.path.isfile(saved))):
        _done(node_id, summary, saved, reused=True)
        return held, summary + "\n" + qs.REUSED_HELD, saved, True
    if summary and _saved_matches(saved, key):
        new_model, _ = load_diffusion_model(saved)
        _carry_patches(model, new_model)
        with _lock:
            _RESULTS[key] = new_model
        text = summary + "\n" + qs.REUSED_FILE
        _done(node_id, summary, saved, reused=True)
        return new_model, text, saved, True

    if sd is None:
        sd = _diffusion_state_dict(model)
    options = qo.build_options(settings)
    plans = _plan(sd, options)
    qs.check_plan(plans, settings)  # raises when nothing would be quantized, saying why
    from ..converter.convert import quantize_state_dict
    from ..converter.errors import Cancelled, ConverterError

    t0 = time.monotonic()
    progress = _Progress(node_id, {p.name for p in plans if p.quantized})
    try:
        new_sd, header_metadata, report = quantize_state_dict(sd, options, progress=progress, cancel=_cancelled,
                                                              calibration=calib_path)
    except Cancelled:
        _send("hybridquant.done", {"node": node_id, "prompt_id": progress.prompt_id, "cancelled": True})
        raise _interrupt() from None
    except ConverterError as e:
        raise QuantizeError(str(e)) from None
    del sd
    if _cancelled():  # Cancel pressed after the last layer: still no file
        _send("hybridquant.done", {"node": node_id, "prompt_id": progress.prompt_id, "cancelled": True})
        raise _interrupt()
    header_metadata = dict(header_metadata or {})
    header_metadata.setdefault("hybridquant.source", "Quantize Model node")
    header_metadata["hybridquant.options"] = json.dumps(qo.public_settings(settings), sort_keys=True)
    header_metadata[SOURCE_KEY] = hashlib.sha256(key.encode()).hexdigest()
    saved = _save(new_sd, header_metadata, settings["filename_prefix"]) if settings["save"] else None
    ops_class = pick_ops(new_sd.keys(), header_metadata)
    new_model = diffusion_model_from_state_dict(new_sd, header_metadata, ops_class, "Quantize Model output")
    # Dynamic-VRAM cores rebuild non-dynamic delegates (hooks, TorchCompileModel) through this.
    if saved:
        register_reload(new_model, load_diffusion_model, (saved, "auto"), 0)
    else:
        register_reload(new_model, diffusion_model_from_state_dict,
                        (new_sd, header_metadata, ops_class, "Quantize Model output"))
    _carry_patches(model, new_model)
    summary = qs.summary_text(report, plans, settings, display_name(saved) if saved else None,
                              time.monotonic() - t0)
    with _lock:
        _RUNS["count"] += 1
        _RESULTS[key] = new_model
        _SUMMARIES[key] = summary
        while len(_SUMMARIES) > 64:
            _SUMMARIES.pop(next(iter(_SUMMARIES)))
        if saved:
            _SAVED[key] = saved
            _SAVED[qo.options_key(settings)] = saved
    log.info("HybridQuant: %s", summary.splitlines()[0])
    _done(node_id, summary, saved, reused=False)
    return new_model, summary, saved, False


def _done(node_id, summary, saved, reused):
    _send("hybridquant.done", {"node": node_id, "prompt_id": _prompt_id(), "summary": summary,
                               "file": display_name(saved) if saved else None, "reused": reused})


def _carry_patches(src, dst) -> None:
    """Keep the input MODEL's sampling setup (model_options, object patches such as a ModelSamplingSD3
    shift). Weight patches are not carried: they are baked into the quantized weights already."""
    clone = src.clone()
    dst.model_options = clone.model_options
    for name, obj in clone.object_patches.items():
        dst.add_object_patch(name, obj)


def saved_for(settings: dict) -> str | None:
    return _SAVED.get(qo.options_key(settings))


__all__ = ["quantize_model", "quantization_runs", "QuantizeError", "content_fingerprint", "source_key",
           "calibration_path", "saved_for"]
