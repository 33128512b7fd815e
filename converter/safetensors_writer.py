"""Atomic, streaming ``.safetensors`` writer: never a partial file at the output path.

See ``safetensors_io.py`` for the file layout; this module writes it.

Public API
----------
``AtomicSafetensorsWriter(path, specs, metadata=None, overwrite=False, fsync=True, sync_every=SYNC_EVERY)``
    ``specs``: ordered ``{name: TensorSpec(dtype, shape)}`` — the complete output, known before any
    data exists (codecs' ``output_specs``). The header is written at once; then
    ``.write(name, tensor)`` stores each tensor exactly once, in ANY order and from any thread (each
    tensor has a fixed offset; ``os.pwrite``). dtype/shape are checked against the spec. Every
    ``sync_every`` bytes (256 MiB) a ``write`` also flushes the file so far (``SYNC_EVERY``). On a clean
    exit of the ``with`` block every tensor must have been written; the temp file is fsynced and
    renamed over ``path`` (then the directory is fsynced). On any exception (incl. KeyboardInterrupt)
    the temp file is removed and ``path`` is untouched. ``.abort()`` does the same explicitly.
    Raises ``OutputFileError`` if ``path`` exists and ``overwrite`` is false.

Faults (full disk, other writers)
--------------------------------
- Before any data, the whole size is reserved (``posix_fallocate``; ``reserve=False`` skips it): a
  full disk, a quota or a file-size limit fails there. Any later write, flush or close error (ENOSPC
  on a filesystem that cannot reserve, EIO ...) is an ``OutputFileError`` saying why ("not enough
  disk space", "file size limit exceeded" ...) and "no output written"; the temp file is removed and
  the output path is untouched.
- Two writers of the same output (two processes, or two threads of one): each writes its own temp
  file; at commit, under an exclusive ``flock`` of the output directory, the output path must still
  hold what it held when the writer opened (nothing, or the file ``overwrite`` replaces). The first to
  commit wins atomically; the other gets an ``OutputFileError`` ("another process wrote this output")
  and its temp file is removed. Without ``overwrite`` the final step is a hard link (fails if the path
  exists, whoever created it) rather than a rename; on a filesystem without hard links, a rename after
  the check. A second writer of the same output in the same process is refused at ``open``.

``write_safetensors(path, tensors, metadata=None, overwrite=False)``
    Small-file convenience on top of the writer (whole dict in memory).
``check_output_path(input_path, output_path, overwrite)``
    The checks every command that writes a new file from an input runs before any work (convert,
    ``--edit-quant``, ``--make-hybrid-mxfp8``): output == input (same path, symlink or hard link),
    a directory, an existing file without ``overwrite``, a missing or read-only output directory.

Temp files and crashes
----------------------
The temp file is ``<dir>/.<output name>.partial-<pid>``, beside the target so the final rename is
atomic on the same filesystem. SIGINT/SIGTERM/exceptions remove it. A SIGKILL or power loss cannot
run cleanup code, so a temp file may remain: every writer (and ``clean_stale_partials``) deletes
``.<name>.partial-<pid>`` files of the same target whose pid is no longer alive. The target path
itself never holds a partial file. Before writing data the full size is reserved with
``posix_fallocate`` where the filesystem supports it, so a full disk fails before any work is done.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import threading
from collections.abc import Mapping

import torch

from .errors import OutputFileError
from .formats.base import TensorSpec
from .safetensors_io import _PARTIAL_RE, byte_view, same_file, st_dtype


def check_output_path(input_path, output_path, overwrite: bool) -> None:
    """Refuse an output that would replace the input or cannot be written, before any work (the
    writer checks the same again at ``open``; this only makes the error come before hours of work)."""
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    same = os.path.abspath(input_path) == os.path.abspath(output_path)
    if not same and os.path.exists(output_path) and os.path.exists(input_path):
        same = same_file(input_path, output_path)  # symlinks and hard links
    if same:
        raise OutputFileError(f"{output_path}: output is the input file; write to a new file (the input is "
                              "never replaced)")
    if os.path.isdir(output_path):
        raise OutputFileError(f"{output_path}: output path is a directory")
    if os.path.exists(output_path) and not overwrite:
        raise OutputFileError(f"{output_path}: output file exists (use --overwrite to replace it)")
    d = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(d):
        raise OutputFileError(f"{output_path}: output directory {d} does not exist")
    if not os.access(d, os.W_OK):
        raise OutputFileError(f"{output_path}: output directory {d} is not writable")


def partial_path(path, pid: int | None = None) -> str:
    """The temp-file name used while writing ``path``."""
    path = os.path.abspath(os.fspath(path))
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.partial-{os.getpid() if pid is None else pid}")


# Temp files of writers alive in THIS process: ``clean_stale_partials`` must not take them for a dead
# writer's (their pid is ours), and a second writer of the same output in this process is refused.
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()

_WHY = {errno.ENOSPC: "not enough disk space", errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file size limit exceeded", errno.EROFS: "read-only file system", errno.EIO: "I/O error"}


def _write_error(path: str, e: OSError, what: str = "write failed") -> OutputFileError:
    why = _WHY.get(e.errno, e.strerror or str(e))
    return OutputFileError(f"{path}: {what}: {why}; no output written")


def _identity(path: str):
    """What the output path holds now (None: nothing), to notice another writer's commit."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def clean_stale_partials(path) -> list[str]:
    """Delete leftover temp files of ``path`` whose writer process is dead (e.g. SIGKILLed)."""
    path = os.path.abspath(os.fspath(path))
    d, base = os.path.split(path)
    removed = []
    try:
        entries = os.listdir(d)
    except OSError:
        return removed
    for entry in entries:
        m = _PARTIAL_RE.match(entry)
        if not m or m.group("name") != base:
            continue
        pid = int(m.group("pid"))
        full = os.path.join(d, entry)
        if (pid != os.getpid() and _pid_alive(pid)) or full in _ACTIVE:
            continue
        try:
            os.unlink(os.path.join(d, entry))
            removed.append(os.path.join(d, entry))
        except FileNotFoundError:
            pass
    return removed


def build_header(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Serialize a header for ``specs`` (packed in the given order). Returns (bytes incl. the 8-byte
    length prefix, {name: (relative offset, nbytes)})."""
    header: dict = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"safetensors metadata must map str to str, got {k!r}: {type(v).__name__}")
        header["__metadata__"] = dict(metadata)
    layout: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, spec in specs.items():
        if name == "__metadata__":
            raise ValueError("'__metadata__' is not a valid tensor name")
        nbytes = spec.nbytes
        header[name] = {"dtype": st_dtype(spec.dtype), "shape": list(spec.shape), "data_offsets": [pos, pos + nbytes]}
        layout[name] = (pos, nbytes)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw, layout


# With ``fsync`` on, every this many bytes written the writer flushes the file so far (fdatasync in the
# calling thread: the converter's writer thread, so it overlaps the math) and drops the now clean pages
# from the page cache. The closing fsync then only has the last stretch to flush, and a large output
# does not push the user's other cached files out of memory.
SYNC_EVERY = 256 << 20


class AtomicSafetensorsWriter:
    """Writes a safetensors file whose header is known up front; see the module docstring."""

    def __init__(self, path, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None,
                 overwrite: bool = False, fsync: bool = True, sync_every: int = SYNC_EVERY, reserve: bool = True):
        self.path = os.path.abspath(os.fspath(path))
        self.specs = dict(specs)
        self.metadata = dict(metadata or {})
        self.overwrite = overwrite
        self.fsync = fsync
        self.sync_every = sync_every
        self.reserve = reserve
        self._target_id = None
        self._unsynced = 0
        self._flusher: threading.Thread | None = None
        self._flush_due = threading.Event()
        self._flush_stop = False
        self._flush_error: OSError | None = None
        self.tmp_path = partial_path(self.path)
        self._fd = -1
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._header, self._layout = build_header(self.specs, self.metadata)
        self.total_bytes = len(self._header) + sum(n for _, n in self._layout.values())

    # -- lifecycle ---------------------------------------------------------------------------------
    def open(self) -> AtomicSafetensorsWriter:
        if os.path.isdir(self.path):
            raise OutputFileError(f"{self.path}: output path is a directory")
        if os.path.exists(self.path) and not self.overwrite:
            raise OutputFileError(f"{self.path}: output file exists (use --overwrite to replace it)")
        d = os.path.dirname(self.path)
        if not os.path.isdir(d):
            raise OutputFileError(f"{self.path}: output directory {d} does not exist")
        self._target_id = _identity(self.path)
        with _ACTIVE_LOCK:
            if self.tmp_path in _ACTIVE:
                raise OutputFileError(f"{self.path}: another conversion in this process is writing this output")
            _ACTIVE.add(self.tmp_path)
        try:
            clean_stale_partials(self.path)
            self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            self._release()
            raise OutputFileError(f"{self.path}: cannot create output file {self.tmp_path} ({e.strerror})") from None
        try:
            if self.reserve:
                self._reserve()
            self._pwrite(memoryview(self._header), 0)
        except BaseException:
            self.abort()
            raise
        return self

    def _release(self) -> None:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(self.tmp_path)

    def _reserve(self) -> None:
        # Reserve the whole file now: a full disk fails here, before minutes of work.
        try:
            os.posix_fallocate(self._fd, 0, self.total_bytes)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OutputFileError(f"{self.path}: {_WHY[e.errno]}: the output needs {self.total_bytes / 1e6:.1f} MB "
                                      f"({e.strerror}); no output written") from None
            # EOPNOTSUPP/EINVAL (filesystem without fallocate): writes will report ENOSPC instead.
        except AttributeError:
            pass

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        done = 0
        total = len(buf)
        try:
            while done < total:
                done += os.pwrite(self._fd, buf[done:], offset + done)
        except OSError as e:
            raise _write_error(self.path, e) from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` under ``name`` (declared in ``specs``); thread-safe, any order, once each."""
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"{name!r} is not declared in the output header")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, header declares {spec.dtype} {tuple(spec.shape)}")
        with self._lock:
            if name in self._written:
                raise ValueError(f"{name}: written twice")
            self._written.add(name)
        rel, nbytes = self._layout[name]
        if nbytes == 0:
            return
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().reshape(-1).view(torch.uint8)
        self._pwrite(byte_view(t), len(self._header) + rel)
        del t  # the view above must not outlive it
        if self.fsync and self.sync_every:
            with self._lock:
                self._unsynced += nbytes
                due = self._unsynced >= self.sync_every
                if due:
                    self._unsynced = 0
            if due:
                self._request_write_back()

    def _request_write_back(self) -> None:
        # In a thread of its own: an fdatasync blocks for as long as the disk takes, and a writer
        # blocked that long would stall the whole pipeline behind it.
        with self._lock:
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="hq-flush", daemon=True)
                self._flusher.start()
        self._flush_due.set()

    def _flush_loop(self) -> None:
        while True:
            self._flush_due.wait()
            self._flush_due.clear()
            if self._flush_stop:
                return
            try:
                self._write_back()
            except OSError as e:  # reported by commit(); the closing fsync would hit it too
                self._flush_error = e
                return

    def _write_back(self) -> None:
        os.fdatasync(self._fd)
        if hasattr(os, "posix_fadvise"):
            try:  # clean pages only: what was written after the fdatasync stays until it is flushed
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def _stop_flusher(self) -> None:
        """Wait for a running write-back; the fd must stay open (and not be reused) until then."""
        if self._flusher is not None:
            self._flush_stop = True
            self._flush_due.set()
            self._flusher.join()
            self._flusher = None

    def missing(self) -> list[str]:
        return [n for n in self.specs if n not in self._written]

    def commit(self) -> str:
        missing = self.missing()
        if missing:
            self.abort()
            raise RuntimeError(f"{self.path}: {len(missing)} declared tensors were never written, e.g. {missing[:3]}")
        try:
            self._stop_flusher()
            if self._flush_error is not None:
                raise _write_error(self.path, self._flush_error)
            try:
                if self.fsync:
                    os.fsync(self._fd)
                os.close(self._fd)
            except OSError as e:
                raise _write_error(self.path, e) from None
            self._fd = -1
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._release()
        if self.fsync:
            try:
                dfd = os.open(os.path.dirname(self.path), os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass
        return self.path

    def _publish(self) -> None:
        """Move the complete temp file to the output path, atomically, unless another writer got there
        first: the path must still hold what it held when this writer opened (nothing, or the file that
        ``overwrite`` replaces). The check and the move run under an exclusive ``flock`` of the output
        directory, so two of our writers cannot interleave them; without ``overwrite`` the move is a
        hard link, which fails if anything (any program) created the path meanwhile."""
        d = os.path.dirname(self.path)
        lock = os.open(d, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _identity(self.path) != self._target_id:
                raise OutputFileError(f"{self.path}: another process wrote this output while this one was "
                                      "converting; not replacing it (this run's output was discarded)")
            if self.overwrite and self._target_id is not None:
                os.replace(self.tmp_path, self.path)
                return
            try:
                os.link(self.tmp_path, self.path)
            except FileExistsError:
                raise OutputFileError(f"{self.path}: output file appeared while converting; not replacing it") from None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                    raise _write_error(self.path, e, "cannot create the output") from None
                os.replace(self.tmp_path, self.path)  # no hard links here: the check above under the lock
                return
            os.unlink(self.tmp_path)
        finally:
            os.close(lock)

    def abort(self) -> None:
        self._stop_flusher()
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass
        self._release()

    def __enter__(self):
        return self.open()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def write_safetensors(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      overwrite: bool = False) -> str:
    """Write a whole (small) dict of tensors atomically."""
    specs = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    with AtomicSafetensorsWriter(path, specs, metadata, overwrite=overwrite) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return w.path


__all__ = ["AtomicSafetensorsWriter", "write_safetensors", "build_header", "partial_path", "clean_stale_partials",
           "SYNC_EVERY"]
