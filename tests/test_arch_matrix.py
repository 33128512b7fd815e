"""The architecture matrix (issue 15 items 1 and 3), against the ComfyUI tree under test.

For every preset architecture (tests/arch_models.py, run by tests/arch_rows.py: ComfyUI's own class at a released checkpoint's
widths, depth 1-2, seeded weights, real key names) and every format the converter writes through
that preset: stock detection of the stored shapes equals the bf16 file's (bare and with the
``model.diffusion_model.`` prefix), the pack's loader builds the same model and its forward is
within the format's tolerance (``arch_rows.TOLERANCE``, derived there), and where this core names
the format in its ``QUANT_ALGOS`` the stock loader does the same.

Cost: the bf16 source and its reference forward are made once per architecture (module-scoped
fixture, deleted after it), each format converted once. CI (0.3.75) runs ``arch_rows.CI_FORMATS``
(FP8 e4m3 and NVFP4) for every architecture; ``HYBRIDQUANT_ARCH_FULL=1`` runs every format (and the
heavy Flux.2 [dev] row, the only Flux.2 variant 0.3.75 detects). The stock core-format rows (NVFP4,
INT8 tensorwise, ConvRot W4A4, asym W4A8) run wherever the core has the format and skip elsewhere.
bench/arch_matrix.py prints the same matrix as a table (bench/RESULTS_ARCH.md).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arch_rows as am  # noqa: E402

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
FULL = os.environ.get("HYBRIDQUANT_ARCH_FULL") == "1"
# The formats the current core loads natively that the issue names (stock rows for every architecture).
CORE_FORMATS = ("nvfp4", "int8_tensorwise", "convrot_w4a4", "asym_w4a8_int8")


def _all_formats():
    from hybridquant.converter.formats import registry

    return registry.format_names()


@pytest.fixture(scope="module", params=list(am.BUILDERS))
def source(request, comfy):
    a, why = am.select(request.param)
    if a is None:
        pytest.skip(f"{request.param}: {why}")
    if a.heavy and not FULL:
        pytest.skip(f"{request.param}: {a.variant} is {a.heavy}; run with HYBRIDQUANT_ARCH_FULL=1")
    # not tmp_path_factory: another pytest session of the same user prunes old basetemp dirs, and
    # these files (0.1-2 GB) live for minutes
    d = Path(tempfile.mkdtemp(prefix=f"hq_arch_{a.row}_"))
    try:
        yield am.make_matrix_source(a, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _check(row: am.Row, src: am.Source, stock_expected: bool):
    where = f"{row.arch} ({row.variant}) as {row.fmt}"
    assert row.quantized > 0, f"{where}: the preset plan quantized no layer"
    assert row.detect == "same", f"{where}: stock detection {row.detect} (bf16: {src.detected!r})"
    assert row.pack == "ok", f"{where}: pack loader: {row.pack}"
    assert row.pack_err <= row.tol, f"{where}: pack forward rel err {row.pack_err:.4f} > {row.tol}"
    if stock_expected:
        assert row.stock == "ok", f"{where}: stock loader: {row.stock}"
        assert row.stock_err <= row.tol, f"{where}: stock forward rel err {row.stock_err:.4f} > {row.tol}"


@pytest.mark.parametrize("fmt", _all_formats())
def test_matrix_row(source, fmt):
    """detect / load (pack, and stock for the core's names) / forward within tolerance."""
    if fmt not in am.CI_FORMATS and not FULL:
        pytest.skip(f"{fmt}: outside CI's formats {am.CI_FORMATS}; HYBRIDQUANT_ARCH_FULL=1 runs it")
    stock = fmt in am.quant_algos() and source.arch.kind != "clip"  # see arch_rows.STOCK_CLIP_L
    row = source.row(fmt, stock=stock)
    _check(row, source, stock)
    if fmt not in CORE_FORMATS:
        source.drop(fmt)


@pytest.mark.parametrize("fmt", CORE_FORMATS)
def test_stock_loads_core_format(source, fmt):
    """Issue 15: NVFP4 files of every architecture, and INT8 tensorwise / ConvRot W4A4 / asym W4A8
    files, load and run in the stock loaders of a core that names the format."""
    algos = am.quant_algos()
    if fmt not in algos:
        import comfyui_version

        pytest.skip(f"ComfyUI {comfyui_version.__version__} has no {fmt!r} in comfy.quant_ops.QUANT_ALGOS")
    if source.arch.kind == "clip":
        pytest.skip(f"clip_l: {am.STOCK_CLIP_L} (arch_rows.STOCK_CLIP_L)")
    row = source.row(fmt, stock=True)  # the matrix row's result when it ran (one conversion per format)
    _check(row, source, True)
    source.drop(fmt)
