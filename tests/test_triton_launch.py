"""ops/triton_launch.py: the key of a cached compiled kernel is never coarser than Triton's own
specialization (CPU), and launches through the cached kernel compute what Triton's own launch does,
for aligned and unaligned pointers and several constexpr values (GPU)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from hybridquant.converter.formats.base import ceil_div  # noqa: E402
from hybridquant.ops import triton_launch  # noqa: E402


@triton.jit
def _axpy(x_ptr, y_ptr, n, a, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) * a + BLOCK, mask=m)


def test_key_separates_what_triton_specializes_on():
    if not hasattr(_axpy, "params"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    k = triton_launch.Kernel(_axpy)
    base = torch.zeros(64)
    x, y = base[:32], base[32:]

    def key(*args, **opts):
        return k.key(args, opts, 0)

    ref = key(x, y, 32, 2.0, 128)
    assert key(x, y, 48, 3.5, 128) == ref  # both ints % 16 == 0 and != 1; floats are not specialized
    assert key(base[1:33], y, 32, 2.0, 128) != ref  # an unaligned pointer
    assert key(x.double(), y, 32, 2.0, 128) != ref  # another dtype
    assert key(x, y, 33, 2.0, 128) != ref and key(x, y, 1, 2.0, 128) != ref  # n % 16, n == 1
    assert key(x, y, 1 << 33, 2.0, 128) != key(x, y, 1 << 4, 2.0, 128)  # 64-bit ints
    assert key(x, y, 32, 2.0, 256) != ref  # constexprs by value
    assert key(x, y, 32, 2.0, 128, num_warps=8) != ref  # launch options
    assert k.key((x, y, 32, 2.0, 128), {}, 1) != ref  # the device
    with pytest.raises(TypeError, match="all 5 parameters"):
        key(x, y, 32, 2.0)


def test_cpu_tensors_take_tritons_own_launch(monkeypatch):
    """No CUDA tensor: the wrapper hands the call to the function itself (the interpreter's path)."""
    seen = []

    class Fn:
        params = ()

        def __getitem__(self, grid):
            return lambda *a, **o: seen.append((grid, a, o)) or "launched"

    k = triton_launch.Kernel(Fn())
    assert k[(3,)](torch.zeros(2), 5, BLOCK=1) == "launched"
    assert seen == [((3,), (seen[0][1][0], 5), {"BLOCK": 1})] and not k._kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_launches_match_tritons_own_on_gpu():
    k = triton_launch.Kernel(_axpy)
    base = torch.randn(4099, device="cuda")
    for x in (base[:4096], base[1:4097], base[3:4099]):  # aligned, then two unaligned starts
        for n in (4096, 4093, 1):
            for block in (128, 1024):
                grid = (triton.cdiv(n, block),)
                y_fast = torch.zeros(4096, device="cuda")
                y_ref = torch.zeros(4096, device="cuda")
                for _ in range(2):  # the second call of a key takes the cached kernel
                    k[grid](x, y_fast, n, 1.5, block)
                _axpy[grid](x, y_ref, n, 1.5, BLOCK=block)
                assert torch.equal(y_fast, y_ref), (x.storage_offset(), n, block)
    if triton_launch.enabled():
        assert len(k._kernels) >= 6  # distinct keys: alignment x (n specializations) x block


def test_inline_key_equals_the_per_argument_reference():
    """``Kernel.key`` computes ``_arg_key`` inline; both forms must give the same key for every kind of
    argument (a key that differs only costs a second cached kernel, but a coarser one would be a bug)."""
    if not hasattr(_axpy, "params"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    k = triton_launch.Kernel(_axpy)
    base = torch.zeros(64)
    cases = [(base[:32], base[32:], 32, 2.0, 128), (base[1:], None, 1, 3, 16), (base, base, True, False, 64),
             (base, base, -(1 << 31), 1 << 31, 32), (base, base, 1 << 40, "s", 8), (base.half(), base, 0, None, 2)]
    for args in cases:
        ref = (0, (), tuple(triton_launch._arg_key(a, c) for a, c in zip(args, k._constexpr)))
        assert k.key(args, {}, 0) == ref, args


def test_host_grid_arithmetic_matches_triton():
    """Triton 3.6's ``cdiv`` / ``next_power_of_2`` are slow to call from Python; the pack's plain-int
    replacements must agree with them."""
    for n in list(range(1, 70)) + [1000, 3072, 4096, 4097, 12288, 15360, (1 << 31) + 1]:
        assert triton_launch.next_pow2(n) == triton.next_power_of_2(n), n
        for b in (1, 16, 64, 128, 1000):
            assert ceil_div(n, b) == triton.cdiv(n, b), (n, b)


def test_direct_launch_only_without_scratch_buffers():
    """The C launcher is called directly only when Triton's launcher would allocate nothing first."""

    class Run:
        def __init__(self, g, p):
            self.global_scratch_size, self.profile_scratch_size = g, p
            self.launch_cooperative_grid, self.launch_pdl = True, False

        def launch(self, *a):
            pass

    class K:
        def __init__(self, run):
            self.run = run

    r = Run(0, 0)
    assert triton_launch._direct_launch(K(r)) == (r.launch, True, False)
    assert triton_launch._direct_launch(K(Run(256, 0))) == (None, None, None)
    assert triton_launch._direct_launch(K(Run(0, 64))) == (None, None, None)
    assert triton_launch._direct_launch(K(object())) == (None, None, None)
