"""ComfyUI for the whole-model benchmark: import a tree, load a file the way a user's loader does (the
pack's loaders, or stock ComfyUI's), keep several models resident, and read back what each layer runs.

Stock FP8 on ComfyUI 0.3.75: ``load_diffusion_model_state_dict`` strips the ``model.diffusion_model.``
prefix from the tensor keys but ``MixedPrecisionOps`` looks layers up in the file's
``_quantization_metadata`` by their names *without* the prefix, verbatim; in a checkpoint-layout file no
name matches, every FP8 weight is cast to bf16 without its ``weight_scale`` (output rel. err ~0.35) and
the scales are left over as "unexpected" keys. A ``diffusion_models``-layout file (no prefix, what
UNETLoader users have) loads as FP8 ``QuantizedTensor`` weights. 0.33 writes the header into per-layer
``.comfy_quant`` tensors before stripping the prefix, so both layouts load there. ``stock_support`` checks
what actually happened on the running core instead of trusting either fact.
"""

from __future__ import annotations

import collections
import gc
import json
import sys
from pathlib import Path

import torch


def import_comfy(root: str, cpu: bool) -> str:
    if not (Path(root) / "comfy" / "ops.py").is_file():
        raise SystemExit(f"--comfy: no ComfyUI tree at {root}")
    sys.path.insert(0, root)
    saved, sys.argv = sys.argv, [sys.argv[0]] + (["--cpu"] if cpu else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_detection
        import comfy.model_management
        import comfy.sd  # noqa: F401
    finally:
        sys.argv = saved
    # 0.3.75 detects Flux with 24 heads whatever the width; 0.33 derives hidden // sum(axes_dim). Only the
    # tiny widths need 0.33's rule on 0.3.75 (a no-op at Flux.1 widths).
    orig = comfy.model_detection.detect_unet_config

    def detect(state_dict, key_prefix, *a, **k):
        cfg = orig(state_dict, key_prefix, *a, **k)
        if isinstance(cfg, dict) and cfg.get("image_model") == "flux":
            cfg["num_heads"] = cfg["hidden_size"] // sum(cfg["axes_dim"])
        return cfg

    comfy.model_detection.detect_unet_config = detect
    import comfyui_version

    return comfyui_version.__version__


def load(path: str, stock: bool):
    """A ModelPatcher for ``path``: stock ComfyUI's diffusion-model loader, or the pack's."""
    import comfy.sd
    import comfy.utils

    from hybridquant.nodes import backend

    if stock:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        fn = comfy.sd.load_diffusion_model_state_dict
        patcher = fn(sd, **backend._with_dynamic_flag(fn, {"model_options": {}, "metadata": metadata}))
    else:
        patcher, _ = backend.load_diffusion_model(path)
    activate(patcher)
    return patcher


def activate(patcher):
    """Make ``patcher`` the loaded one (fully on the device); ComfyUI evicts others only if VRAM runs out,
    and swaps a clone's patches (LoRA) in for its parent's."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)


def unload():
    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _linears(patcher):
    for m in patcher.model.diffusion_model.modules():
        # stock MixedPrecisionOps' Linear is not always a torch.nn.Linear subclass
        if type(m).__name__ == "Linear" or isinstance(m, torch.nn.Linear):
            yield m


def layer_paths(patcher, stock: bool) -> tuple[dict, str | None]:
    """Counter of what each Linear ran (the pack: ``format:path``; stock: ``ops class:weight dtype``)."""
    paths, label = collections.Counter(), None
    for m in _linears(patcher):
        if stock:
            w = getattr(m, "weight", None)
            if type(w).__name__ == "QuantizedTensor":
                label = "native_quant (comfy_quant, QuantizedTensor)"
            elif hasattr(m, "scale_weight") and label is None:
                label = "scaled_fp8"
            kind = "QuantizedTensor" if type(w).__name__ == "QuantizedTensor" else str(getattr(w, "dtype", "?"))
            paths[type(m).__qualname__.split(".")[0] + ":" + kind.replace("torch.", "")] += 1
        elif getattr(m, "hq_format", None) is not None:
            paths[f"{m.hq_format}:{getattr(m, 'hq_last_path', '?')}"] += 1
        else:
            paths["plain"] += 1
    return dict(paths), label


def file_quant_layers(path: str) -> int:
    """How many layers the file quantizes (its ``.comfy_quant`` tensors, else its header's layer list)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        n = sum(k.endswith(".comfy_quant") for k in f.keys())
        meta = f.metadata() or {}
    if n == 0 and "_quantization_metadata" in meta:
        n = len(json.loads(meta["_quantization_metadata"]).get("layers", {}))
    return n


def stock_support(patcher, path: str, version: str) -> str | None:
    """None if stock ComfyUI loaded every quantized layer of ``path`` as quantized; else why not."""
    want = file_quant_layers(path)
    got = 0
    for m in _linears(patcher):
        w = getattr(m, "weight", None)
        if type(w).__name__ == "QuantizedTensor" or (w is not None and w.dtype.itemsize == 1 and hasattr(m, "scale_weight")):
            got += 1
    if got >= want:
        return None
    return (f"stock ComfyUI {version} loaded {got} of the file's {want} quantized layers as quantized; the "
            "others hold casts of the stored codes without their scales (0.3.75 with a key-prefixed file: "
            "bench/model_comfy.py): not timed")


def _plain_tensors(obj, depth=0):
    """Plain tensors inside ``obj`` (tensor subclasses such as QuantizedTensor are opened up)."""
    if depth > 6 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        if type(obj) in (torch.Tensor, torch.nn.Parameter):
            yield obj
            return
        if hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            for n in names:
                yield from _plain_tensors(getattr(obj, n, None), depth + 1)
        for v in vars(obj).values():
            yield from _plain_tensors(v, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _plain_tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _plain_tensors(v, depth + 1)
    elif hasattr(obj, "weights") and not isinstance(obj, torch.nn.Module):  # ComfyUI's weight adapters (LoRA)
        yield from _plain_tensors(obj.weights, depth + 1)


def resident_bytes(patcher, device) -> int:
    """Bytes this model holds on ``device``: its parameters and buffers, plus patch tensors (LoRA) there.
    Counted per model so several models can stay loaded while each row's peak is its own."""
    seen, total = set(), 0
    tensors = []
    for m in patcher.model.modules():
        tensors += [*m._parameters.values(), *m._buffers.values()]
    tensors.append(getattr(patcher, "patches", None))
    for t in _plain_tensors(tensors):
        if t.device.type != device.type:
            continue
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total
