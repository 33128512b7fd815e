"""Low-host-cost launches of the pack's Triton kernels: the compiled kernel is looked up by a small key
and started through its launcher directly, skipping ``JITFunction.run``'s per-call work.

Why: the eager forward of a quantized model is host-bound, and on the H200 host Triton's own launch
path (argument binding, specialization, cache-key hashing, global-variable checks, launch metadata)
took ~25 us per call in bench/bench_host.py's profile of an FP8 layer against ~10 us for the launcher
itself. A Flux forward makes 80+ such launches.

How (Triton 3.6's runtime, read from its source; other versions take Triton's own path):
- ``Kernel(fn)[grid](*args, **options)`` with EVERY parameter of ``fn`` positional, constexprs included
  (the launcher receives them and ignores them, as ``JITFunction.run`` passes them).
- The key is built here from what Triton specializes on: per tensor its dtype and whether its address
  is 16-byte aligned; per int ``== 1``, ``% 16 == 0`` and whether it fits 32 bits; constexprs by value;
  floats not at all; plus the device index and the launch options. A key may be finer than Triton's
  (it only costs a lookup of the same kernel twice), never coarser: a coarser key could run a kernel
  compiled for an aligned pointer on an unaligned one.
- The first call of a key goes through ``fn[grid]`` (compiles or finds the kernel in Triton's cache and
  launches it) and keeps the returned ``CompiledKernel``; later calls call ``kernel.run`` as
  ``JITFunction.run`` does, on torch's current stream of the device, with no launch hooks. Any hook
  installed (profilers: ``triton.knobs.runtime.launch_enter_hook``, in 3.6 a ``HookChain`` that is
  always present and normally empty) sends every call through Triton's path.
"""

from __future__ import annotations

import torch

try:
    import triton
    from triton import knobs

    _FAST = triton.__version__.startswith("3.6.")
except Exception:  # pragma: no cover - depends on the install
    triton = None
    _FAST = False

_I32 = (-(1 << 31), (1 << 31) - 1)


# Host-side grid / block arithmetic: ``converter.formats.base.ceil_div`` and ``next_pow2`` below, not
# ``triton.cdiv`` / ``triton.next_power_of_2``: in Triton 3.6 they
# are ``constexpr_function``s, and calling one from Python goes through its argument-unwrapping wrapper:
# 4.5 / 6.0 us per call against 0.06 us for the integer expression (timeit, Triton 3.6.0), i.e. ~10 us
# of host time per quantizer launch (bench/profile_model.py showed 1400 such calls in 10 forwards).
def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _hooks_idle() -> bool:
    """No launch hook to call: 3.6 keeps an (empty) ``HookChain``; anything else set is a hook."""
    for h in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if h is not None and getattr(h, "calls", True):
            return False
    return True


def enabled() -> bool:
    """Whether launches take the direct route (a Triton whose runtime this module was written against)."""
    return _FAST


def _arg_key(a, constexpr: bool):
    """What Triton specializes on for one argument (the reference form of ``Kernel.key``'s inline one)."""
    if constexpr:
        return a
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() & 15 == 0
    if isinstance(a, bool):
        return bool, a
    if isinstance(a, int):  # (Triton: i32, i64 below 2^63, u64 from there)
        return a == 1, a & 15 == 0, _I32[0] <= a <= _I32[1], a >= 1 << 63
    if isinstance(a, float):
        return float
    return type(a), a  # None and anything else Triton may specialize on: by value


_Tensor = torch.Tensor


class Kernel:
    """A ``@triton.jit`` function launched with a cached compiled kernel (module docstring)."""

    def __init__(self, fn):
        self.fn = fn
        # (under TRITON_INTERPRET the decorator returns an InterpretedFunction without .params: CPU
        # tensors never take the direct route)
        self._constexpr = tuple(p.is_constexpr for p in getattr(fn, "params", ()))
        self._kernels: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **options: self.launch(grid, args, options)

    def key(self, args, options, device_index: int):
        """``(device, options, per-argument _arg_key)``, the per-argument part computed inline: a call per
        argument cost ~0.4 us each, half of this key's host time (timeit: 5.0 -> 2.4 us for 10 args)."""
        if len(args) != len(self._constexpr):
            raise TypeError(f"{self.fn.__name__}: pass all {len(self._constexpr)} parameters positionally, "
                            f"got {len(args)}")
        lo, hi = _I32
        u64 = 1 << 63
        return (device_index, tuple(options.items()) if options else (), tuple([
            a if c
            else (a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, _Tensor)
            else (bool, a) if a is True or a is False
            else (a == 1, a & 15 == 0, lo <= a <= hi, a >= u64) if type(a) is int
            else _arg_key(a, False)
            for a, c in zip(args, self._constexpr)]))

    def launch(self, grid, args, options):
        dev = None
        for a in args:
            if isinstance(a, _Tensor):
                dev = a.device
                break
        if not _FAST or dev is None or dev.type != "cuda" or not _hooks_idle() or torch.compiler.is_compiling():
            # (under torch.compile: Triton's own call, which Dynamo traces as a user kernel)
            return self.fn[grid](*args, **options)
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        if idx != torch._C._cuda_getDevice():
            # Triton compiles, loads and launches for the CURRENT device; a tensor on another GPU
            # (a model on cuda:1 while cuda:0 is current) runs under a guard through Triton's own path
            with torch.cuda.device(idx):
                return self.fn[grid](*args, **options)
        key = self.key(args, options, idx)
        hit = self._kernels.get(key)
        if hit is None:
            k = self.fn[grid](*args, **options)
            if hasattr(k, "result"):  # an async compile's future
                k = k.result()
            self._kernels[key] = (k, *_direct_launch(k))
            return k
        k, direct, coop, pdl = hit
        n = len(grid)
        gx, gy, gz = grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1
        stream = torch._C._cuda_getCurrentRawStream(idx)
        if direct is not None:
            direct(gx, gy, gz, stream, k.function, coop, pdl, None, None, k.packed_metadata, None, None, None, *args)
        else:
            k.run(gx, gy, gz, stream, k.function, k.packed_metadata, None, None, None, *args)
        return k


def _direct_launch(k) -> tuple:
    """``(C launcher, cooperative flag, PDL flag)`` under ``k.run`` when ``k.run`` would only forward to
    it, else ``(None, None, None)``: Triton 3.6's ``CudaLauncher.__call__`` allocates the scratch buffers
    (none when both scratch sizes are 0) and calls ``launch(grid, stream, function, cooperative, pdl,
    global_scratch, profile_scratch, *its args)``; skipping that Python frame saves ~1.5 us per call."""
    r = getattr(k, "run", None)
    if (r is None or getattr(r, "global_scratch_size", 1) != 0 or getattr(r, "profile_scratch_size", 1) != 0
            or not callable(getattr(r, "launch", None))):
        return None, None, None
    return r.launch, r.launch_cooperative_grid, r.launch_pdl


class Tuned:
    """An ``@triton.autotune`` kernel whose choice is kept per caller key and then launched directly.

    Why: ``Autotuner.run`` rebuilds its key, prunes configs and looks the choice up on every call (on
    the H200 an INT8 layer took 184 us of host time per call against 89 us for an FP8 layer,
    bench/bench_host.py). The first call of a key goes through the autotuner (benchmarks the configs
    once, as before); its ``best_config`` is then launched through ``Kernel``.

    ``launch(key, grid, *args)``: ``args`` are every parameter of the kernel except the config's
    constexprs, which must be the kernel's LAST parameters (the config fills them in, in order);
    ``grid`` is a tuple or a function of the config's values, as for the autotuner. ``key`` must
    separate whatever makes the caller want another tuning (the autotuner's own key fields); it need
    not separate specializations (``Kernel`` keys those itself)."""

    def __init__(self, autotuner):
        self.tuner = autotuner
        self.kernel = Kernel(autotuner.fn)
        self._names = tuple(p.name for p in getattr(autotuner.fn, "params", ()))
        self.choices: dict = {}

    def launch(self, key, grid, *args):
        if torch.compiler.is_compiling():  # Dynamo traces the autotuner as a user kernel, not our launcher
            self.tuner[grid](*args)
            return
        hit = self.choices.get(key)
        if hit is None:
            self.tuner[grid](*args)
            c = self.tuner.best_config
            tail = tuple(c.kwargs[n] for n in self._names[len(args):])
            if len(args) + len(tail) != len(self._names) or len(tail) != len(c.kwargs):
                raise TypeError(f"{self.tuner.fn.__name__}: the config's parameters must be the last ones")
            self.choices[key] = (c.kwargs, tail, {"num_warps": c.num_warps, "num_stages": c.num_stages})
            return
        consts, tail, opts = hit
        self.kernel[grid(consts) if callable(grid) else grid](*args, *tail, **opts)
