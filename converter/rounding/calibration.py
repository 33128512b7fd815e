"""Calibration statistics of linear layers: collect them from real forward passes, store, load.

Sidecar file (``.safetensors``; written atomically, read one layer at a time)
----------------------------------------------------------------------------
Per linear layer ``L`` (its state-dict prefix, e.g. ``double_blocks.0.img_attn.qkv``) with
``N = in_features``:

- ``L.input_xtx``    float32 ``[N, N]``: ``X^T X / n`` over every input row ``x`` the layer saw (the
  input second moment; the Hessian proxy of GPTQ). Absent for layers stored diagonal-only.
- ``L.input_sqmean`` float32 ``[N]``: ``mean(x_j^2)`` (the diagonal of the above; always present).
- ``L.input_absmax`` float32 ``[N]``: ``max |x_j|`` per input channel.
- ``L.input_count``  int64 ``[]``: ``n``, the number of input rows (tokens) seen.

Header ``__metadata__``: ``hybridquant_calibration`` = ``"1"`` (format version), ``prefix`` (the
name prefix that was stripped from module names when collecting, informational) and free-form
``source``.

Layer names must match the checkpoint's layer prefixes. Module names seen at collection time often
differ from checkpoint keys by a prefix (``diffusion_model.`` inside ComfyUI's model, ``model.`` in
transformers' wrappers, ``model.diffusion_model.`` in full checkpoints): ``Collector(prefix_map=...)``
rewrites names when collecting and ``CalibrationFile(prefix_map=...)`` when loading; the loader also
tries the common prefixes by itself when a name is not found as is.

Memory: ``X^T X`` costs ``4 N^2`` bytes per layer (37.7 MB for N = 3072, 944 MB for N = 15360), so
``Collector(max_full_dim=...)`` keeps only the diagonal for wider layers (they then get the weighted
clipping search instead of GPTQ).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping

import torch

from ..errors import InputFileError
from ..formats import get_spec
from ..safetensors_io import SafetensorsReader
from ..safetensors_writer import write_safetensors

FORMAT_VERSION = "1"
SUFFIXES = ("input_xtx", "input_sqmean", "input_absmax", "input_count")
# Tried, in this order, when a checkpoint layer name is not in the file as is.
COMMON_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.", "encoder.")


class CalibrationError(InputFileError):
    """A calibration file is unreadable, not a calibration file, or does not fit the model."""


def map_name(name: str, prefix_map: Mapping[str, str] | None) -> str:
    """Rewrite the first matching prefix: ``{"diffusion_model.": ""}`` strips, ``{"": "model."}`` adds."""
    if prefix_map:
        for old, new in prefix_map.items():
            if name.startswith(old):
                return new + name[len(old):]
    return name


# ------------------------------------------------------------------------------------------------
# Collection
# ------------------------------------------------------------------------------------------------
class _Acc:
    __slots__ = ("xtx", "sqsum", "absmax", "count", "full")

    def __init__(self, n: int, device, dtype, full: bool):
        self.full = full
        self.xtx = torch.zeros((n, n), dtype=dtype, device=device) if full else None
        self.sqsum = torch.zeros(n, dtype=dtype, device=device)
        self.absmax = torch.zeros(n, dtype=torch.float32, device=device)
        self.count = 0


class Collector:
    """Forward hooks on every ``nn.Linear`` (or subclass, e.g. ComfyUI's ops) of ``model`` that sum
    ``X^T X``, ``x^2`` and ``max |x|`` of the layer inputs.

    Use as a context manager (hooks removed on exit) or ``attach()``/``detach()``; statistics keep
    accumulating over several attach periods. ``include``: regex a (mapped) layer name must match.
    ``dtype``: accumulator dtype (float32; float64 for exact small tests). ``device``: where the
    accumulators live (default: the input's device). ``token_stride``: use every k-th input row
    only (cheaper for video models). ``max_full_dim``: layers with more inputs keep only the diagonal.
    """

    def __init__(self, model: torch.nn.Module, *, prefix_map: Mapping[str, str] | None = None,
                 include: str | None = None, dtype: torch.dtype = torch.float32, device=None,
                 token_stride: int = 1, max_full_dim: int = 16384,
                 module_filter: Callable[[str, torch.nn.Module], bool] | None = None):
        self.model = model
        self.prefix_map = dict(prefix_map or {})
        self.include = re.compile(include) if include else None
        self.dtype = dtype
        self.device = device
        self.token_stride = max(1, int(token_stride))
        self.max_full_dim = int(max_full_dim)
        self.module_filter = module_filter
        self.acc: dict[str, _Acc] = {}
        self._handles: list = []

    def layers(self) -> dict[str, torch.nn.Module]:
        out = {}
        for name, mod in self.model.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            mapped = map_name(name, self.prefix_map)
            if self.include is not None and not self.include.search(mapped):
                continue
            if self.module_filter is not None and not self.module_filter(mapped, mod):
                continue
            out[mapped] = mod
        return out

    def attach(self) -> Collector:
        if self._handles:
            return self
        for name, mod in self.layers().items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name, mod.in_features)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Collector:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, name: str, n: int):
        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.shape[-1] != n:
                return None
            with torch.no_grad():
                x2 = x.detach().reshape(-1, n)
                if self.token_stride > 1:
                    x2 = x2[:: self.token_stride]
                acc = self.acc.get(name)
                dev = self.device if self.device is not None else x2.device
                if acc is None:
                    acc = self.acc[name] = _Acc(n, dev, self.dtype, n <= self.max_full_dim)
                # Reduce on the input's device (GPU matmul), then add into the accumulator's device:
                # moves N^2 numbers per call instead of the activations.
                xf = x2.to(dtype=self.dtype)
                if acc.full:
                    acc.xtx.add_((xf.t() @ xf).to(acc.xtx.device))
                acc.sqsum.add_(xf.square().sum(dim=0).to(acc.sqsum.device))
                acc.absmax = torch.maximum(acc.absmax, xf.abs().amax(dim=0).to(device=acc.absmax.device, dtype=torch.float32))
                acc.count += int(xf.shape[0])
            return None
        return hook

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sidecar tensors (means, not sums), float32 on CPU."""
        out: dict[str, torch.Tensor] = {}
        for name in sorted(self.acc):
            a = self.acc[name]
            if a.count == 0:
                continue
            if a.full:
                out[f"{name}.input_xtx"] = (a.xtx / a.count).to(device="cpu", dtype=torch.float32).contiguous()
            out[f"{name}.input_sqmean"] = (a.sqsum / a.count).to(device="cpu", dtype=torch.float32)
            out[f"{name}.input_absmax"] = a.absmax.to("cpu")
            out[f"{name}.input_count"] = torch.tensor(a.count, dtype=torch.int64)
        return out

    def save(self, path, *, source: str = "", overwrite: bool = True) -> str:
        sd = self.state_dict()
        if not sd:
            raise CalibrationError(f"{path}: no calibration statistics were collected (no Linear layer ran)")
        meta = {"hybridquant_calibration": FORMAT_VERSION, "source": source,
                "prefix": ",".join(f"{k}->{v}" for k, v in self.prefix_map.items())}
        return write_safetensors(path, sd, metadata=meta, overwrite=overwrite)


def collect(model: torch.nn.Module, batches: Iterable, forward: Callable | None = None, **collector_opts) -> Collector:
    """Run ``forward(model, batch)`` (default ``model(batch)``) for every batch under a collector."""
    forward = forward or (lambda m, b: m(b))
    col = Collector(model, **collector_opts)
    with torch.no_grad(), col:
        for b in batches:
            forward(model, b)
    return col


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
class CalibrationFile:
    """A sidecar file opened for reading, one layer at a time (nothing else is held in memory).

    ``stats_for(layer, in_features)`` -> ``{"xtx"?, "sqmean", "absmax", "count"}``; raises
    ``CalibrationError`` naming the file and the layer when it is missing or its shapes do not fit.
    ``check(layers)`` validates a whole ``{layer: in_features}`` plan up front and lists every problem.
    """

    def __init__(self, path, prefix_map: Mapping[str, str] | None = None):
        self.path = os.fspath(path)
        self.prefix_map = dict(prefix_map or {})
        try:
            self._reader = SafetensorsReader(self.path)
        except InputFileError as e:
            raise CalibrationError(f"calibration file: {e}") from None
        meta = self._reader.metadata or {}
        if meta.get("hybridquant_calibration") is None:
            raise CalibrationError(f"{self.path}: not a calibration file (no 'hybridquant_calibration' in its "
                                   "header); create one with the 'Collect Calibration' node or "
                                   "hybridquant.converter.rounding.calibration.collect")
        if meta["hybridquant_calibration"] != FORMAT_VERSION:
            raise CalibrationError(f"{self.path}: calibration format version {meta['hybridquant_calibration']!r} "
                                   f"is not supported (expected {FORMAT_VERSION!r})")
        self.metadata = meta
        self.infos = self._reader.infos
        self.layers = sorted({k.rsplit(".", 1)[0] for k in self.infos if k.rsplit(".", 1)[-1] in SUFFIXES})
        self._layer_set = set(self.layers)

    def close(self) -> None:
        self._reader.close() if hasattr(self._reader, "close") else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def resolve(self, layer: str) -> str | None:
        """The file's name for checkpoint layer ``layer``, or None."""
        cands = [map_name(layer, self.prefix_map), layer]
        for p in COMMON_PREFIXES:
            if layer.startswith(p):
                cands.append(layer[len(p):])
            cands.append(p + layer)
        for c in cands:
            if c in self._layer_set:
                return c
        return None

    def _missing(self, layer: str) -> CalibrationError:
        # Same layer under another prefix? Then a prefix map fixes it; otherwise it is simply absent.
        near = [n for n in self.layers if n.endswith("." + layer) or layer.endswith("." + n)][:3]
        hint = (f"; the file has {', '.join(near)} (same layer, other name prefix: give CalibrationFile a prefix_map)" if near else
                "; collect statistics with this layer running (or quantize it with another method)")
        return CalibrationError(f"{self.path}: no calibration statistics for layer '{layer}' "
                                f"({len(self.layers)} layers in the file){hint}")

    def stats_for(self, layer: str, in_features: int, device=None) -> dict[str, torch.Tensor]:
        key = self.resolve(layer)
        if key is None:
            raise self._missing(layer)
        out: dict[str, torch.Tensor] = {}
        for suffix, want in (("input_sqmean", (in_features,)), ("input_absmax", (in_features,)),
                             ("input_count", ()), ("input_xtx", (in_features, in_features))):
            full = f"{key}.{suffix}"
            if full not in self.infos:
                if suffix == "input_xtx":
                    continue
                raise CalibrationError(f"{self.path}: layer '{layer}' lacks tensor '{full}'")
            shape = tuple(self.infos[full].shape)
            if shape != want:
                raise CalibrationError(f"{self.path}: layer '{layer}': '{full}' has shape {shape}, but the weight "
                                       f"has {in_features} input features (expected {want}); the file was "
                                       "collected from a different model")
            t = self._reader.read(full)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CalibrationError(f"{self.path}: layer '{layer}': '{full}' contains NaN or Inf")
            out[suffix[len("input_"):]] = t.to(device) if device is not None else t
        if int(out["count"]) <= 0:
            raise CalibrationError(f"{self.path}: layer '{layer}' has a sample count of 0")
        return out

    def absmax(self, layer: str, in_features: int) -> torch.Tensor | None:
        """The per-channel input absmax of ``layer`` (None when the layer is not in the file)."""
        key = self.resolve(layer)
        if key is None or f"{key}.input_absmax" not in self.infos:
            return None
        t = self._reader.read(f"{key}.input_absmax")
        if tuple(t.shape) != (in_features,):
            raise CalibrationError(f"{self.path}: layer '{layer}': '{key}.input_absmax' has shape {tuple(t.shape)}, "
                                   f"but the weight has {in_features} input features")
        return t

    def check(self, layers: Mapping[str, int]) -> None:
        """Raise one CalibrationError listing every missing or mismatched layer of ``layers``."""
        problems = []
        for layer, n in layers.items():
            key = self.resolve(layer)
            if key is None:
                problems.append(f"'{layer}' missing")
                continue
            info = self.infos.get(f"{key}.input_sqmean")
            if info is None or tuple(info.shape) != (n,):
                found = tuple(info.shape) if info is not None else "no input_sqmean"
                problems.append(f"'{layer}' has {found} statistics, weight has {n} input features")
        if problems:
            shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
            raise CalibrationError(f"{self.path}: calibration statistics do not fit {len(problems)} of "
                                   f"{len(layers)} layers to quantize: {shown}")


def prepare_calibration(plans, calibration, prefix_map: Mapping[str, str] | None = None,
                        method: str = "gptq") -> CalibrationFile | None:
    """Converter hook, called once after planning and before the output header is built.

    ``plans``: the converter's ``LayerPlan`` list (``layer``, ``shape``, ``format``, ``opts``,
    ``method``, ``quantized``). ``calibration``: a path, an open ``CalibrationFile`` or None.
    - Every quantized layer whose method is ``method`` must have statistics: one CalibrationError
      lists all that do not fit, before any work is done (and without a file: an error saying so).
    - FP8 e4m3fn layers that carry an ``input_scale`` option (``--input_scale``) get the calibrated
      static activation scale ``max |x| / 448`` instead of the placeholder 1.0.
    Returns the open file (``stats_for(layer, in_features)`` is thread-safe) or None.
    """
    need = {p.layer: int(p.shape[1]) for p in plans if p.quantized and p.method == method}
    if calibration is None:
        if need:
            first = next(iter(need))
            raise CalibrationError(f"rounding method '{method}' needs calibration statistics (--calibration FILE) "
                                   f"for {len(need)} layers, e.g. '{first}'")
        return None
    cf = calibration if isinstance(calibration, CalibrationFile) else CalibrationFile(calibration, prefix_map)
    cf.check(need)
    for p in plans:
        if p.quantized and "input_scale" in p.opts and get_spec(p.format).input_scale:
            a = cf.absmax(p.layer, int(p.shape[1]))
            if a is not None and float(a.max()) > 0:
                p.opts["input_scale"] = float(a.max()) / 448.0
    return cf


def load_stats(path, layers: Mapping[str, int], prefix_map: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Load and validate the statistics of ``layers`` (``{layer: in_features}``) at once (small models)."""
    with CalibrationFile(path, prefix_map) as f:
        f.check(layers)
        return {layer: f.stats_for(layer, n) for layer, n in layers.items()}


__all__ = ["CalibrationError", "Collector", "CalibrationFile", "collect", "load_stats", "prepare_calibration",
           "map_name", "SUFFIXES"]
