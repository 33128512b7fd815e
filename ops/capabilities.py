"""Every device / capability check of the runtime, in one place.

The matmul path for quantized layers is decided ONCE per device (``path_for(device)``, cached) and
logged once. Paths:

- ``"mx_blockscaled"``: NVIDIA SM >= 10.0 with torch >= 2.10 and ``torch.nn.functional.scaled_mm``:
  MXFP8 block-scaled matmul (BlockWise1x32, SWIZZLE_32_4_4, e8m0 scales), activations quantized per
  call to MXFP8 (``matmul_mx.py``).
- ``"fp8_tensorwise"``: SM 8.9 (Ada) and 9.x (Hopper) with ``torch._scaled_mm``: tensorwise FP8 GEMM
  with a fused dynamic activation scale (``matmul_fp8.py``); MXFP8 / Hybrid MXFP8 weights are
  re-expressed as true tensorwise FP8 once at load (H100 raises CUBLAS_STATUS_NOT_SUPPORTED for the
  MX call, so there is no MX path there).
- ``"dequant"``: everything else (CPU, MPS, older GPUs): weights stay stored quantized and are
  dequantized per layer per call, then ``F.linear``.

Features on top of the path (``features``): ``fp8_rowwise`` (SM 8.9+, row-wise ``_scaled_mm``) and
``int8_tensorcore`` (SM 8.0+ with ``torch._int_mm``) run the W8A8 kernels of FP8 per-row / INT8 layers.

bitsandbytes 4-bit layers use the bitsandbytes CUDA kernels when ``bnb_cuda_available()``; otherwise
they are dequantized per call by our codec.

Tests mock the capability with ``override_capability(...)`` (there is no Blackwell GPU here).
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger("hybridquant.ops")

PATH_MX = "mx_blockscaled"
PATH_FP8 = "fp8_tensorwise"
PATH_DEQUANT = "dequant"
PATHS = (PATH_MX, PATH_FP8, PATH_DEQUANT)

_lock = threading.Lock()
_paths: dict[str, str] = {}
_override: dict[str, tuple[int, int] | None] = {}
_bnb_checked: dict[str, bool] = {}
_demoted_logged: set[tuple[str, str]] = set()


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return device.type


def device_capability(device) -> tuple[int, int] | None:
    """(major, minor) of an NVIDIA GPU, None for any other device. Honours ``override_capability``."""
    key = device_key(device)
    if key in _override:
        return _override[key]
    if not key.startswith("cuda") or torch.version.cuda is None:
        return None  # ROCm / CPU / MPS: no NVIDIA FP8 tensor-core paths
    return tuple(torch.cuda.get_device_capability(torch.device(key)))


def override_capability(device, capability: tuple[int, int] | None) -> None:
    """Pretend ``device`` has ``capability`` (tests only: there is no Blackwell GPU here)."""
    key = device_key(device)
    with _lock:
        _override[key] = capability
        _paths.pop(key, None)


def clear_overrides() -> None:
    with _lock:
        for key in list(_override):
            _paths.pop(key, None)
        _override.clear()


def mx_matmul_supported() -> bool:
    fn = getattr(torch.nn.functional, "scaled_mm", None)
    return fn is not None and hasattr(torch.nn.functional, "ScalingType") and _torch_version() >= (2, 10)


def fp8_matmul_supported() -> bool:
    return hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn")


def int8_matmul_supported(capability: tuple[int, int] | None) -> bool:
    """INT8 tensor cores through ``torch._int_mm``: NVIDIA SM 8.0+ (RTX 30xx, A100, Ada, Hopper)."""
    return capability is not None and capability >= (8, 0) and hasattr(torch, "_int_mm")


def decide_path(capability: tuple[int, int] | None) -> str:
    """Pure decision from an NVIDIA capability (None = not an NVIDIA GPU)."""
    if capability is None:
        return PATH_DEQUANT
    if capability >= (10, 0) and mx_matmul_supported():
        return PATH_MX
    if capability >= (8, 9) and fp8_matmul_supported():
        # SM 10+ without the MX API still has tensorwise FP8.
        return PATH_FP8
    return PATH_DEQUANT


def path_for(device) -> str:
    """The matmul path of ``device``: decided on first use, then cached and logged once."""
    key = device_key(device)
    path = _paths.get(key)
    if path is not None:
        return path
    with _lock:
        path = _paths.get(key)
        if path is None:
            cap = device_capability(key)
            path = decide_path(cap)
            _paths[key] = path
            name = torch.cuda.get_device_name(torch.device(key)) if cap is not None and key not in _override else key
            log.info("HybridQuant: matmul path for %s (%s, capability %s, torch %s): %s",
                     key, name, cap, torch.__version__, path)
    return path


# Device features a format's ``spec.kernels`` can name, in order of preference (the first feature of
# the device that the format lists decides its kernel).
FEATURE_MX = PATH_MX
FEATURE_FP8 = PATH_FP8
FEATURE_FP8_ROWWISE = "fp8_rowwise"  # row-wise scaled FP8 _scaled_mm: SM 8.9+ (Ada, Hopper, Blackwell)
FEATURE_INT8 = "int8_tensorcore"  # INT8 tensor cores (torch._int_mm): SM 8.0+ (RTX 30xx, A100, Ada, Hopper)
FEATURE_TRITON = "triton_cuda"  # our Triton 4-bit kernels (ops/dequant4.py): SM 8.9+ (native e4m3 loads)
FEATURE_CUDA = "cuda"  # any CUDA GPU (bitsandbytes kernels)


def features(device) -> tuple[str, ...]:
    """What ``device`` can run fast, best first; from ``path_for`` and the capability (one place)."""
    path = path_for(device)
    cap = device_capability(device)
    out = []
    if path == PATH_MX:
        out.append(FEATURE_MX)
    if path in (PATH_MX, PATH_FP8):
        out.append(FEATURE_FP8)
        out.append(FEATURE_FP8_ROWWISE)  # same gate: SM 8.9+ with torch._scaled_mm
    if int8_matmul_supported(cap):
        out.append(FEATURE_INT8)
    if dq4_cuda(device):
        out.append(FEATURE_TRITON)
    if cap is not None or (torch.device(device).type == "cuda" and device_key(device) not in _override):
        out.append(FEATURE_CUDA)
    return tuple(out)


def core_quant_algos() -> frozenset[str] | None:
    """The format names the running ComfyUI core loads natively (its ``comfy.quant_ops.QUANT_ALGOS``),
    or None when that cannot be read (no ComfyUI, or a core without the registry)."""
    try:
        from comfy import quant_ops  # noqa: PLC0415 - only inside a running ComfyUI
    except Exception:  # noqa: BLE001 - any import failure means "cannot tell"
        return None
    algos = getattr(quant_ops, "QUANT_ALGOS", None)
    return frozenset(algos) if isinstance(algos, dict) else None


def core_dynamic_vram() -> bool:
    """True when the running ComfyUI core has the dynamic-VRAM (comfy-aimdo) protocol our layers take part
    in (``ops/dynamic_vram.py``): ``ModelPatcherDynamic`` gives each cast module a virtual allocation
    ``_v`` for its weight + bias, ``comfy.ops.cast_modules_with_vbar`` / ``resolve_cast_module_with_vbar``
    fault it in, LoRA arrives as ``<param>_lowvram_function`` (ComfyUI 0.33). False on 0.3.75 (no such
    patcher) and on any core whose patcher lacks those entry points: the loaders then keep
    ``disable_dynamic=True`` where the loader takes it. Whether aimdo is *switched on* in this process
    (a GPU, not ``--disable-dynamic-vram``) is the core's decision at start-up (``CoreModelPatcher``)."""
    try:
        import comfy.model_patcher as mp  # noqa: PLC0415 - only inside a running ComfyUI
        import comfy.ops as cops  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - any import failure means "no"
        return False
    return (hasattr(mp, "ModelPatcherDynamic") and hasattr(mp, "LowVramPatch")
            and hasattr(cops, "cast_modules_with_vbar") and hasattr(cops, "resolve_cast_module_with_vbar"))


def bnb_cuda_available(device) -> bool:
    """True when bitsandbytes' CUDA 4-bit kernels can run on ``device``."""
    key = device_key(device)
    if not key.startswith("cuda") or key in _override:
        return False
    hit = _bnb_checked.get(key)
    if hit is None:
        try:
            import bitsandbytes.functional  # noqa: F401

            hit = True
        except Exception as e:  # missing or broken install: stay on our dequantizer
            log.info("HybridQuant: bitsandbytes unavailable (%s); 4-bit layers dequantize per call", e)
            hit = False
        _bnb_checked[key] = hit
    return hit


def triton_cuda(device) -> bool:
    """Our Triton kernels (activation quantizer, 8-bit GEMV) can run on ``device``."""
    if torch.device(device).type != "cuda" or device_key(device) in _override:
        return False
    from .matmul_fp8 import _HAVE_TRITON

    return _HAVE_TRITON


def dq4_cuda(device) -> bool:
    """The 4-bit Triton kernels can run: Triton on CUDA and SM >= 8.9, where Triton converts the
    e4m3 block scales natively (below it does not compile them)."""
    cap = device_capability(device)
    return cap is not None and cap >= (8, 9) and triton_cuda(device)


def log_demotion(layer: str, path: str, err: BaseException) -> None:
    """One log line per (layer, path) when a fast path fails at run time and the layer falls back."""
    k = (layer, path)
    if k in _demoted_logged:
        return
    _demoted_logged.add(k)
    log.warning("HybridQuant: %s: %s path failed (%s: %s); this layer now dequantizes per call",
                layer, path, type(err).__name__, err)
