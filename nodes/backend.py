"""Bridge between the nodes and ComfyUI's stock loaders, with our ops chosen from the file.

ComfyUI facts this relies on (DESIGN.md §3):
- ``model_options["custom_operations"]`` makes ComfyUI use our ops class verbatim (and skip its own
  header -> ``.comfy_quant`` handling), so ``ops.state_dict.prepare_state_dict`` prepares the state
  dict first (packed BNB weights presented with logical shapes for model detection, etc.).
- checkpoint loaders take the text-encoder ops through ``te_model_options``.
- current ComfyUI's loaders have a ``disable_dynamic`` keyword that 0.3.75 lacks. On a core whose
  dynamic-VRAM protocol our layers take part in (``ops.capabilities.core_dynamic_vram()``, 0.33) we
  leave the core's choice alone (aimdo dynamic VRAM when it is on); on another core that has the
  keyword we pass ``disable_dynamic=True`` (ARCHITECTURE.md, "Dynamic VRAM on current cores").
- dynamic cores rebuild a patcher through ``patcher.cached_patcher_init`` (non-dynamic delegates for
  hooks / TorchCompileModel, multi-GPU clones): our loaders register themselves there, as stock ones do.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os

log = logging.getLogger("HybridQuant")

def _ops_module():
    from .. import ops

    return ops


def pick_ops(keys, metadata, override: str = "auto"):
    """The ops class for a state dict (``override`` "auto" lets ``ops.choose_ops`` decide)."""
    ops = _ops_module()
    return ops.choose_ops(list(keys), metadata or {}, override=None if override in (None, "", "auto") else override)


def prepare(sd, metadata):
    from ..ops.state_dict import prepare_state_dict

    return prepare_state_dict(sd, metadata or {})


def adopt(patcher):
    """``ops.adopt_patcher``: LoRAs on 4-bit layers are applied on the fly (never requantized)."""
    if patcher is None:
        return None
    return _ops_module().adopt_patcher(patcher)


def _with_dynamic_flag(fn, kwargs: dict, disable_dynamic: bool = False) -> dict:
    """``kwargs`` for the core loader ``fn``: ``disable_dynamic`` passed only where ``fn`` takes it, True when
    asked for or when this core's dynamic VRAM is not the protocol our layers support."""
    from ..ops.capabilities import core_dynamic_vram

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if "disable_dynamic" in params and (disable_dynamic or not core_dynamic_vram()):
        kwargs = dict(kwargs, disable_dynamic=True)
    return kwargs


def register_reload(patcher, factory, args: tuple, index=None) -> None:
    """``cached_patcher_init`` on dynamic cores: the core calls ``factory(*args[, disable_dynamic=True])``
    (and takes ``[index]`` of the result) to rebuild this model; stock loaders register themselves alike."""
    from ..ops.capabilities import core_dynamic_vram

    if patcher is not None and core_dynamic_vram() and hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (factory, args) if index is None else (factory, args, index)


@contextlib.contextmanager
def load_errors(path: str):
    """Every user error of a load (bad header, metadata, layer data) as one ``ModelLoadError`` naming
    the file: ComfyUI shows its message. Anything else is a bug and keeps its traceback."""
    from ..converter.errors import ConverterError, ModelLoadError
    from ..converter.formats import FormatError

    try:
        yield
    except ModelLoadError:
        raise
    except (ConverterError, FormatError) as e:
        msg = str(e)
        if path not in msg:
            msg = f"{os.path.basename(path)}: {msg}"
        raise ModelLoadError(msg) from None


def _guarded(fn):
    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        with load_errors(path if isinstance(path, str) else ", ".join(map(str, path))):
            return fn(path, *args, **kwargs)

    return wrapper


def load_file(path: str):
    """(state dict, header metadata) of a model file, after the converter's reader has validated its
    header (the same rules for every file the pack opens)."""
    import comfy.utils

    from ..converter.safetensors_io import read_header

    with load_errors(path):
        read_header(path)
    sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    return sd, (metadata or {})


def diffusion_model_from_state_dict(sd: dict, metadata: dict, ops_class, source: str, extra_options=None,
                                    disable_dynamic: bool = False):
    """A MODEL (ModelPatcher) from a (quantized or plain) diffusion-model state dict."""
    import comfy.sd

    model_options = dict(extra_options or {})
    model_options["custom_operations"] = ops_class
    sd = prepare(sd, metadata)
    fn = comfy.sd.load_diffusion_model_state_dict
    kwargs = _with_dynamic_flag(fn, {"model_options": model_options, "metadata": metadata}, disable_dynamic)
    model = fn(sd, **kwargs)
    if model is None:
        raise RuntimeError(f"{source}: ComfyUI could not detect the model type of this diffusion model "
                           f"(no known architecture matches its layer names/shapes)")
    return adopt(model)


@_guarded
def load_diffusion_model(path: str, override: str = "auto", disable_dynamic: bool = False):
    sd, metadata = load_file(path)
    ops_class = pick_ops(sd.keys(), metadata, override)
    log.info("HybridQuant: loading %s with %s", path, getattr(ops_class, "__name__", ops_class))
    model = diffusion_model_from_state_dict(sd, metadata, ops_class, path, disable_dynamic=disable_dynamic)
    register_reload(model, load_diffusion_model, (path, override), 0)
    return model, ops_class


@_guarded
def load_checkpoint(path: str, override: str = "auto", embedding_directory=None, disable_dynamic: bool = False):
    import comfy.sd

    sd, metadata = load_file(path)
    ops_class = pick_ops(sd.keys(), metadata, override)
    sd = prepare(sd, metadata)
    fn = comfy.sd.load_state_dict_guess_config
    kwargs = _with_dynamic_flag(fn, {
        "output_vae": True, "output_clip": True, "embedding_directory": embedding_directory,
        "model_options": {"custom_operations": ops_class},
        "te_model_options": {"custom_operations": ops_class},
        "metadata": metadata,
    }, disable_dynamic)
    out = fn(sd, **kwargs)
    if out is None:
        raise RuntimeError(f"{path}: ComfyUI could not detect the checkpoint type")
    model, clip, vae = out[:3]
    adopt(model)
    register_reload(model, load_checkpoint, (path, override, embedding_directory), 0)
    if clip is not None:
        adopt(clip.patcher)
        register_reload(clip.patcher, checkpoint_clip_patcher, (path, override, embedding_directory))
    return model, clip, vae, ops_class


def checkpoint_clip_patcher(path: str, override: str = "auto", embedding_directory=None, disable_dynamic=False):
    """The CLIP patcher of a checkpoint, reloaded (``cached_patcher_init`` of ``load_checkpoint``'s CLIP)."""
    clip = load_checkpoint(path, override, embedding_directory, disable_dynamic=disable_dynamic)[1]
    return None if clip is None else clip.patcher


def clip_patcher(paths: list[str], clip_type: str, override: str = "auto", embedding_directory=None,
                 disable_dynamic=False):
    """``load_clip``'s patcher, reloaded (its ``cached_patcher_init``)."""
    return load_clip(paths, clip_type, override, embedding_directory, disable_dynamic=disable_dynamic)[0].patcher


@_guarded
def load_clip(paths: list[str], clip_type: str, override: str = "auto", embedding_directory=None,
              disable_dynamic: bool = False):
    import comfy.sd

    sds = []
    chosen = []
    for p in paths:
        sd, metadata = load_file(p)
        ops_class = pick_ops(sd.keys(), metadata, override)
        chosen.append(ops_class)
        sds.append(prepare(sd, metadata))
    # One CLIP object holds every text encoder with one ops class: choose the first quantized one.
    ops_class = chosen[0]
    ct = getattr(comfy.sd.CLIPType, clip_type.upper(), None)
    if ct is None:
        raise ValueError(f"unknown CLIP type {clip_type!r} for this ComfyUI")
    fn = comfy.sd.load_text_encoder_state_dicts
    kwargs = _with_dynamic_flag(fn, {"embedding_directory": embedding_directory, "clip_type": ct,
                                     "model_options": {"custom_operations": ops_class}}, disable_dynamic)
    clip = fn(sds, **kwargs)
    adopt(clip.patcher)
    register_reload(clip.patcher, clip_patcher, (list(paths), clip_type, override, embedding_directory))
    return clip, ops_class


def clip_types() -> list[str]:
    import comfy.sd

    names = [m.name.lower() for m in comfy.sd.CLIPType]
    first = ["stable_diffusion", "sd3", "flux"]
    return [n for n in first if n in names] + [n for n in names if n not in first]
