"""Library entry points of the converter: ``convert_file`` (streaming, file -> file) and
``quantize_state_dict`` (in memory, for the ComfyUI "Quantize Model" node).

Streaming pipeline of ``convert_file`` (peak memory = a few copies of the largest tensor):

    reader thread ──(read-ahead: 1 tensor)──> compute (caller's thread) ──(1 batch)──> writer thread
    os.preadv one tensor                      quantize_weight + error stat           os.pwrite at its offset

The whole output header is computed from the plan and ``codec.output_specs`` before any data is read,
so the writer can place every tensor at its final offset while the next one is being quantized.
``preadv``/``pwrite`` and torch's kernels release the GIL, so on 2 cores reading, math and writing
overlap. Memory is recycled instead of allocated per tensor (fresh memory costs a page fault per 4 KiB,
more than the arithmetic): the reader fills ``1 + prefetch`` reusable byte buffers, round-to-nearest
grid layers quantize into pooled output buffers (``_OutputPool``) that the writer hands back, and the
grid codecs work in cache-sized row bands (``formats/grids.py``), so no weight-sized float32 copy exists.
The writer flushes the output every 256 MiB in its own thread (``safetensors_writer.SYNC_EVERY``), so the
closing fsync is short. The output goes to a temp file beside the target and is renamed into place only when complete
(``safetensors_writer.AtomicSafetensorsWriter``); any exception (incl. Ctrl+C, a cancel callback, a full
disk) removes the temp file and never touches the input.

``progress(done_bytes, total_bytes, current_name)`` is called after each tensor; ``cancel()`` is polled
before each tensor and raises ``Cancelled`` when it returns true.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping

import torch

from . import transforms as tfm
from .detection import DETECTION_SAFE
from .error_stats import relative_error, sample_fraction
from .errors import Cancelled, InputFileError, LayerError, OptionError, OutputFileError
from .formats import FormatError, get_codec
from .formats.base import TensorSpec
from .formats.grids import output_allocator
from .metadata import build_header as build_quant_header
from .metadata import encode_comfy_quant
from .metadata import parse_header as parse_quant_header
from .plan import UNSTORABLE, LayerPlan, Planner, PlanOptions
from .report import ConversionReport, LayerRecord
from .rounding import quantize_weight
from .safetensors_io import SafetensorsReader, read_header, same_file
from .safetensors_writer import AtomicSafetensorsWriter

log = logging.getLogger("hybridquant")
# .comfy_quant keys the converter adds itself (and the transforms, applied around the codec)
_CODEC_ONLY_DROP = ("full_precision_matrix_mult",) + tfm.KEYS


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def codec_opts(p: LayerPlan) -> dict:
    opts = {k: v for k, v in p.opts.items() if k not in _CODEC_ONLY_DROP}
    opts["name"] = p.layer
    return opts


def comfy_quant_dict(p: LayerPlan) -> dict | None:
    """The ``.comfy_quant`` dict of a planned layer (None for bitsandbytes layers)."""
    md = get_codec(p.format).metadata(**codec_opts(p))
    t = tfm.of(p.opts)
    if md is None and not t:
        return None
    # bitsandbytes layers with transforms: a .comfy_quant entry beside their own quant state
    md = dict(md) if md is not None else {"format": p.format}
    md.update(t)
    if p.opts.get("full_precision_matrix_mult"):
        md["full_precision_matrix_mult"] = True
    if get_codec(p.format).spec.storage != "exact":
        # Padded/packed storage: the logical shape goes into .comfy_quant (loaders never guess it
        # from storage; stock ComfyUI ignores the extra key).
        md["orig_shape"] = [int(p.shape[0]), int(p.shape[1])]
    return md


class OutputLayout:
    """The output file as a function of the plan: tensor specs in order, header metadata."""

    def __init__(self, plans: list[LayerPlan], input_specs: Mapping[str, TensorSpec], options: PlanOptions,
                 input_metadata: Mapping[str, str] | None = None):
        self.plans = plans
        self.specs: dict[str, TensorSpec] = {}
        self.outputs: dict[str, list[str]] = {}  # input tensor name -> output names it produces
        self.comfy_quant: dict[str, torch.Tensor] = {}
        header_layers: dict[str, dict] = {}
        for p in plans:
            if not p.quantized:
                self._add(p.name, input_specs[p.name], p.name)
                continue
            try:
                specs = get_codec(p.format).output_specs(p.shape, **codec_opts(p))
            except FormatError as e:
                raise LayerError(f"layer {p.layer}: {e}") from None
            specs.update(tfm.output_specs(p.shape, tfm.of(p.opts)))
            for suffix, spec in specs.items():
                self._add(f"{p.layer}.{suffix}", spec, p.name)
            md = comfy_quant_dict(p)
            if md is not None:
                header_layers[p.layer] = md
                if options.comfy_quant:
                    t = encode_comfy_quant(md)
                    self.comfy_quant[f"{p.layer}.comfy_quant"] = t
                    self._add(f"{p.layer}.comfy_quant", TensorSpec(torch.uint8, tuple(t.shape)), p.name)
        # An input that already holds quantized layers (copied unchanged: their dtype is not a float)
        # keeps their header entries; entries of layers we re-quantize are replaced. Other metadata
        # (modelspec.* ...) is kept as is.
        try:
            old = parse_quant_header(input_metadata)
        except FormatError as e:
            raise LayerError(f"input header: {e}") from None
        ghosts = [layer for layer in old if f"{layer}.weight" not in self.specs]
        if ghosts:  # header entries of layers the file does not have: dropped, never copied
            log.warning("input header %s lists %d layer(s) not in the file (%s); dropped from the output's header",
                        "_quantization_metadata", len(ghosts), ", ".join(ghosts[:5]))
        kept = {layer: d for layer, d in old.items() if layer not in ghosts and layer not in header_layers}
        new_layers = {**kept, **header_layers} if options.save_quant_metadata else kept
        self.metadata: dict[str, str] = build_quant_header(new_layers, input_metadata)
        self.header_layers = header_layers

    def _add(self, name: str, spec: TensorSpec, source: str) -> str:
        if name in self.specs:
            raise LayerError(f"output tensor {name!r} (from {source!r}) collides with another tensor of the input; "
                             "is the file already quantized?")
        self.specs[name] = spec
        self.outputs.setdefault(source, []).append(name)
        return name

    def nbytes(self, names) -> int:
        return sum(self.specs[n].nbytes for n in names)


def make_plans(infos_in_order, options: PlanOptions) -> list[LayerPlan]:
    planner = Planner(options)
    plans = [planner.plan(name, shape, dtype) for name, shape, dtype in infos_in_order]
    kept = [p.name for p in plans if p.reason.startswith(DETECTION_SAFE)]
    if kept:  # say it once per run, naming the layers (each plan's reason says why)
        log.warning("%d layer(s) kept in high precision because ComfyUI's model detection reads their shape "
                    "and the chosen format packs it: %s", len(kept), ", ".join(kept))
    unstorable = [p.name for p in plans if p.reason.startswith(UNSTORABLE)]
    if unstorable:
        log.warning("%d layer(s) kept in high precision because the chosen format cannot store their shape: %s",
                    len(unstorable), ", ".join(unstorable))
    return plans


def plan_file(input_path, options: PlanOptions | None = None) -> list[LayerPlan]:
    """The per-layer plan of converting ``input_path`` (header only: nothing is read or written)."""
    infos, _ = read_header(input_path)
    return make_plans(((i.name, i.shape, _dtype_name(i.dtype)) for i in infos.values()), options or PlanOptions())


def plan_state_dict(state_dict: Mapping[str, torch.Tensor], options: PlanOptions | None = None) -> list[LayerPlan]:
    """The per-layer plan of ``quantize_state_dict`` on ``state_dict`` (nothing is quantized)."""
    items = ((k, tuple(v.shape), _dtype_name(v.dtype)) for k, v in state_dict.items() if isinstance(v, torch.Tensor))
    return make_plans(items, options or PlanOptions())


def _prepare_calibration(plans: list[LayerPlan], calibration):
    """The rounding package's hook: checks that every calibrated layer has statistics (one error listing
    all that do not, before any work) and sets calibrated FP8 input scales. Returns the open file or None."""
    if calibration is None and not any(p.quantized and p.method == "gptq" for p in plans):
        return None
    from .rounding.calibration import prepare_calibration

    return prepare_calibration(plans, calibration)


def _quantize_one(p: LayerPlan, w: torch.Tensor, device: str, error_stats,
                  calib=None) -> tuple[dict[str, torch.Tensor], tuple[float, float] | None]:
    codec = get_codec(p.format)
    opts = codec_opts(p)
    wd = w.to(device, non_blocking=True) if device != "cpu" else w
    stats = calib.stats_for(p.layer, int(p.shape[1]), device=device) if calib is not None and p.method == "gptq" else None
    t = tfm.of(p.opts)
    if t and calib is not None and stats is None and calib.resolve(p.layer) is not None:
        stats = calib.stats_for(p.layer, int(p.shape[1]), device=device)  # the branch fit uses them
    try:
        if t:
            out = tfm.quantize(codec, wd, t, method=p.method, stats=stats, **opts)
        else:
            out = quantize_weight(codec, wd, method=p.method, stats=stats, **opts)
    except (FormatError, ValueError) as e:  # NonFiniteError is a FormatError; rounding raises ValueError
        raise LayerError(f"layer {p.layer} ({p.name}): {e}") from None
    sample = sample_fraction(error_stats)
    if sample is None:
        err = None
    elif t:
        dopts = {k: v for k, v in opts.items() if k != "dtype"}
        w32 = wd.to(torch.float32)
        d = tfm.decode(codec, out, p.shape, t, **dopts)
        err = (float((d - w32).norm() / w32.norm().clamp_min(1e-30)), 1.0)
    else:
        err = relative_error(codec, out, wd, p.shape, opts, sample=sample)
    if device != "cpu":
        out = {k: v.to("cpu") for k, v in out.items()}
    return out, err


def _records(plans: list[LayerPlan], layout: OutputLayout, input_specs: Mapping[str, TensorSpec]) -> list[LayerRecord]:
    recs = []
    for p in plans:
        recs.append(LayerRecord(name=p.name, shape=list(p.shape), dtype=p.dtype, format=p.format, reason=p.reason,
                                method=p.method if p.quantized else None, bytes_in=input_specs[p.name].nbytes,
                                bytes_out=layout.nbytes(layout.outputs.get(p.name, [])),
                                transforms=tfm.of(p.opts) or None if p.quantized else None))
    return recs


def check_paths(input_path, output_path, overwrite: bool) -> None:
    if output_path is None:
        return
    if os.path.exists(output_path) and os.path.exists(input_path) and same_file(input_path, output_path):
        raise OutputFileError(f"{output_path}: output is the input file; the input is never modified in place")
    if os.path.abspath(os.fspath(output_path)) == os.path.abspath(os.fspath(input_path)):
        raise OutputFileError(f"{output_path}: output is the input file; the input is never modified in place")
    if os.path.isdir(output_path):
        raise OutputFileError(f"{output_path}: output path is a directory")
    if os.path.exists(output_path) and not overwrite:
        raise OutputFileError(f"{output_path}: output file exists (use --overwrite to replace it)")
    d = os.path.dirname(os.path.abspath(os.fspath(output_path)))
    if not os.path.isdir(d):
        raise OutputFileError(f"{output_path}: output directory {d} does not exist")
    if not os.access(d, os.W_OK):
        raise OutputFileError(f"{output_path}: output directory {d} is not writable")


def _refuse_ghost_configs(input_path, infos) -> None:
    """A ``.comfy_quant`` tensor without its layer's weight would be copied as a plain tensor into a
    file that every loader refuses: refuse the input instead, naming the layer."""
    for name in infos:
        if name.endswith(".comfy_quant") and f"{name[: -len('.comfy_quant')]}.weight" not in infos:
            layer = name[: -len(".comfy_quant")]
            raise InputFileError(f"{input_path}: {name} describes layer {layer}, but '{layer}.weight' is not in the file")


def _check_device(device: str) -> str:
    device = device or "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OptionError(f"--device: unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {device}: CUDA is not available in this torch build / machine")
    return str(dev)


def convert_file(input_path, output_path, options: PlanOptions | None = None, progress: Callable | None = None,
                 cancel: Callable[[], bool] | None = None, device: str = "cpu", overwrite: bool = False,
                 dry_run: bool = False, error_stats: bool = True, prefetch: int = 1,
                 calibration=None, advise: bool = False) -> ConversionReport:
    """Convert ``input_path`` to ``output_path`` following ``options``; see the module docstring."""
    options = options or PlanOptions()
    device = _check_device(device)
    sample_fraction(error_stats)
    t0 = time.monotonic()
    infos, metadata = read_header(input_path)
    _refuse_ghost_configs(input_path, infos)
    if not dry_run:
        check_paths(input_path, output_path, overwrite)
    plans = make_plans(((i.name, i.shape, _dtype_name(i.dtype)) for i in infos.values()), options)
    calib = _prepare_calibration(plans, calibration)
    input_specs = {n: i.spec for n, i in infos.items()}
    layout = OutputLayout(plans, input_specs, options, metadata)
    report = ConversionReport(input=os.fspath(input_path), output=None if dry_run else os.fspath(output_path),
                              dry_run=dry_run, device=device, layers=_records(plans, layout, input_specs))
    report.bytes_in = os.path.getsize(input_path)
    from .safetensors_writer import build_header

    header, _ = build_header(layout.specs, layout.metadata)
    report.bytes_out = len(header) + sum(s.nbytes for s in layout.specs.values())
    if dry_run:
        if advise:  # reads and test-quantizes every planned weight, hence opt-in
            from .rounding.advice import advise_file, format_advice

            report.advice = format_advice(advise_file(input_path, plans, calib))
        if calib is not None:
            calib.close()
        return report
    recs = {r.name: r for r in report.layers}
    total = sum(i.nbytes for i in infos.values())
    try:
        with SafetensorsReader(input_path) as reader, \
                AtomicSafetensorsWriter(output_path, layout.specs, layout.metadata, overwrite=overwrite) as writer:
            _run_pipeline(plans, layout, reader, writer, recs, device, error_stats, progress, cancel, total, prefetch,
                          calib)
    finally:
        if calib is not None:
            calib.close()
    report.seconds = time.monotonic() - t0
    return report


_STOP = object()


class _OutputPool:
    """Reusable byte buffers for the quantized weights the compute thread hands to the writer (installed
    with ``grids.output_allocator`` around round-to-nearest layers on CPU). A buffer is lent for one
    layer, ``claim``-ed with that layer's outputs and given back by the writer after writing them;
    anything lent that is not among the outputs (a codec's own temporary) is simply forgotten."""

    MAX_FREE = 3  # the writer holds at most ~3 layers' outputs at once (computing, queued, writing)

    def __init__(self):
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def alloc(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= int(d)
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            # (indices, not list.remove: tensors compare element-wise)
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            else:
                if self._free:  # all too small: let the largest go instead of keeping one more
                    self._free.pop(max(range(len(self._free)), key=lambda i: self._free[i].numel()))
                buf = None
        if buf is None:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        with self._lock:
            self._lent[buf.data_ptr()] = buf
        return buf[:nbytes].view(dtype).reshape(shape)

    def claim(self, tensors) -> list[torch.Tensor]:
        """The lent buffers backing ``tensors``; forgets every other loan."""
        with self._lock:
            lent, self._lent = self._lent, {}
        return [lent.pop(t.untyped_storage().data_ptr()) for t in tensors
                if t.device.type == "cpu" and t.untyped_storage().data_ptr() in lent]

    def give(self, bufs: list[torch.Tensor]) -> None:
        with self._lock:
            self._free.extend(bufs)
            del self._free[:-self.MAX_FREE]


def _run_pipeline(plans, layout, reader, writer, recs, device, error_stats, progress, cancel, total, prefetch,
                  calib=None):
    stop = threading.Event()
    # Input tensors alive at once: the one being quantized + ``prefetch`` read ahead, each read into one
    # of that many reusable byte buffers (fresh memory costs page faults that take longer than the
    # read itself). The reader takes a free buffer BEFORE reading, so a blocked reader never holds an
    # extra tensor (bounded peak memory). A buffer goes back to the pool once nothing refers to it: right
    # after quantization when no output aliases the input, otherwise once the writer has written it.
    free_bufs: queue.Queue = queue.Queue()
    for _ in range(1 + max(prefetch, 0)):
        free_bufs.put(None)  # allocated on first use, grown when a larger tensor comes
    read_q: queue.Queue = queue.Queue()
    pool = _OutputPool()
    write_q: queue.Queue = queue.Queue(maxsize=1)
    errors: list[BaseException] = []

    def put(q, item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def read_loop():
        try:
            for p in plans:
                while True:
                    if stop.is_set():
                        return
                    try:
                        buf = free_bufs.get(timeout=0.2)
                        break
                    except queue.Empty:
                        continue
                need = reader.infos[p.name].nbytes
                if buf is None or buf.numel() < need:
                    buf = None  # drop the small one first: never two large buffers for one slot
                    buf = torch.empty(max(need, 1), dtype=torch.uint8)
                if not put(read_q, (p, reader.read(p.name, buf), buf)):
                    return
            put(read_q, _STOP)
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)
            stop.set()

    def write_loop():
        try:
            while True:
                try:
                    item = write_q.get(timeout=0.2)
                except queue.Empty:
                    if stop.is_set():
                        return
                    continue
                if item is _STOP:
                    return
                batch, buf, owned = item
                for name, t in batch:
                    writer.write(name, t)
                del batch, item
                if buf is not None:
                    free_bufs.put(buf)
                pool.give(owned)
        except BaseException as e:
            errors.append(e)
            stop.set()

    def get(q):
        while True:
            if errors:
                raise errors[0]
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                continue

    threads = [threading.Thread(target=read_loop, name="hq-read", daemon=True),
               threading.Thread(target=write_loop, name="hq-write", daemon=True)]
    for t in threads:
        t.start()
    done = 0
    try:
        while True:
            item = get(read_q)
            if item is _STOP:
                break
            p, t, buf = item
            if cancel is not None and cancel():
                raise Cancelled("conversion cancelled")
            owned = []
            if p.quantized:
                # round to nearest calls the codec once: its output may come from the pool (other
                # methods' many trial quantizations would only churn it)
                with output_allocator(pool.alloc if p.method == "rtn" else None):
                    out, err = _quantize_one(p, t, device, error_stats, calib)
                owned = pool.claim(out.values())
                if err is not None:
                    recs[p.name].rel_error, recs[p.name].error_fraction = err
                batch = [(f"{p.layer}.{k}", v) for k, v in out.items()]
                cq = f"{p.layer}.comfy_quant"
                if cq in layout.comfy_quant:
                    batch.append((cq, layout.comfy_quant[cq]))
            else:
                batch = [(p.name, t)]
            keep = buf if any(_aliases(v, buf) for _, v in batch) else None
            del t, item
            if keep is None:
                free_bufs.put(buf)
            del buf
            if not put(write_q, (batch, keep, owned)):
                break
            done += reader.infos[p.name].nbytes
            if progress is not None:
                progress(done, total, p.name)
        put(write_q, _STOP)
        threads[1].join()
        if errors:
            raise errors[0]
    finally:
        if errors or threads[1].is_alive():
            stop.set()
        stop.set()
        for th in threads:
            th.join(timeout=30)


def _aliases(t: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether ``t`` lives in ``buf``'s memory (an output that is the input, or a view of it)."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    a, n = buf.untyped_storage().data_ptr(), buf.untyped_storage().nbytes()
    b = t.untyped_storage().data_ptr()
    return a <= b < a + n or b <= a < b + t.untyped_storage().nbytes()


def quantize_state_dict(state_dict: Mapping[str, torch.Tensor], options: PlanOptions | None = None,
                        progress: Callable | None = None, cancel: Callable[[], bool] | None = None,
                        device: str = "cpu", error_stats: bool = True, input_metadata: Mapping[str, str] | None = None,
                        calibration=None):
    """Quantize an in-memory state dict. Returns ``(new_state_dict, header_metadata, report)``.

    ``header_metadata`` is the safetensors ``__metadata__`` to save with it (``_quantization_metadata``
    when enabled, plus ``input_metadata``). Tensors that are not quantized are passed through (same
    objects, no copies). ``progress(done, total, name)`` / ``cancel()`` as in ``convert_file``.
    """
    options = options or PlanOptions()
    device = _check_device(device)
    sample_fraction(error_stats)
    t0 = time.monotonic()
    # ComfyUI 0.3.75 may carry the header string as a "_quantization_metadata" entry: not a tensor
    state_dict = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if (options.target_size is not None or options.target_bpw is not None) and options.layer_config is None:
        import dataclasses

        from .budget import budget_for_state_dict

        cfg, _ = budget_for_state_dict(state_dict, options, calibration)
        options = dataclasses.replace(options, layer_config=cfg)
    plans = make_plans(((k, tuple(v.shape), _dtype_name(v.dtype)) for k, v in state_dict.items()), options)
    calib = _prepare_calibration(plans, calibration)
    try:
        return _quantize_sd(state_dict, plans, options, calib, progress, cancel, device, error_stats, input_metadata, t0)
    finally:
        if calib is not None:
            calib.close()


def _quantize_sd(state_dict, plans, options, calib, progress, cancel, device, error_stats, input_metadata, t0):
    input_specs = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in state_dict.items()}
    layout = OutputLayout(plans, input_specs, options, input_metadata)
    report = ConversionReport(device=device, layers=_records(plans, layout, input_specs))
    recs = {r.name: r for r in report.layers}
    total = sum(s.nbytes for s in input_specs.values())
    out: dict[str, torch.Tensor] = {}
    done = 0
    for p in plans:
        if cancel is not None and cancel():
            raise Cancelled("quantization cancelled")
        t = state_dict[p.name]
        if p.quantized:
            q, err = _quantize_one(p, t.detach().to("cpu") if device == "cpu" else t.detach(), device, error_stats, calib)
            if err is not None:
                recs[p.name].rel_error, recs[p.name].error_fraction = err
            for k, v in q.items():
                out[f"{p.layer}.{k}"] = v
            cq = f"{p.layer}.comfy_quant"
            if cq in layout.comfy_quant:
                out[cq] = layout.comfy_quant[cq]
        else:
            out[p.name] = t
        done += input_specs[p.name].nbytes
        if progress is not None:
            progress(done, total, p.name)
    report.bytes_in = total
    report.bytes_out = sum(s.nbytes for s in layout.specs.values())
    report.seconds = time.monotonic() - t0
    return out, dict(layout.metadata), report


__all__ = ["convert_file", "quantize_state_dict", "PlanOptions", "OutputLayout", "make_plans", "check_paths",
           "encode_comfy_quant", "comfy_quant_dict", "relative_error"]
