"""The streaming pipeline of ``convert.convert_file``: read, quantize and write in three overlapping steps.

Peak memory is a few copies of the largest tensor:

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

``run_pipeline`` raises the first error of any thread in the caller's thread and stops the others.
"""

from __future__ import annotations

import math
import queue
import threading

import torch

from .errors import Cancelled
from .formats.grids import output_allocator
from .quantize_layer import quantize_layer

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
        nbytes = math.prod(int(d) for d in shape) * torch.empty((), dtype=dtype).element_size()
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


def run_pipeline(plans, layout, reader, writer, recs, device, error_stats, progress, cancel, total, prefetch,
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
                    out, err = quantize_layer(p, t, device, error_stats, calib)
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
