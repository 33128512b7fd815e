"""The converter's performance paths give the same bits as the plain ones: banded grid quantization
(several bands, partial last band, tiles crossing nothing), FP8 table decoding, reused read buffers,
periodic write-back in the writer, and a full conversion through the pipeline with a tiny buffer pool."""

from __future__ import annotations

import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridquant.converter.convert import convert_file
from hybridquant.converter.formats import get_codec, grids
from hybridquant.converter.formats.base import TensorSpec
from hybridquant.converter.plan import PlanOptions
from hybridquant.converter.safetensors_io import SafetensorsReader
from hybridquant.converter.safetensors_writer import AtomicSafetensorsWriter

CASES = [("float8_e4m3fn", {}), ("float8_e5m2", {}), ("float8_e4m3fn_rowwise", {}),
         ("float8_e4m3fn_blockwise", {"group_size": 16}), ("int8_tensorwise", {}),
         ("int8_tensorwise", {"per_row": True}), ("int8_blockwise", {"group_size": 8})]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_banded_quantize_matches_whole_tensor(monkeypatch, name, opts, dtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(75, 37, generator=g) * 0.02
    w.view(-1)[::97] *= 40  # outliers set the scales
    w = w.to(dtype)
    codec = get_codec(name)
    kind, bs = codec.layout(opts)
    # several bands, the last one partial (and for tiles: bands of whole tile rows)
    monkeypatch.setattr(grids, "BAND_ELEMS", 37 * 5)
    assert grids.band_rows(kind, (75, 37), bs, w.device) < 75
    out = codec.quantize(w, **opts)
    # the whole-tensor computation, spelled out independently of encode_rows
    x = w.to(torch.float32, copy=True)
    x.div_(grids.expand_grid(kind, out["weight_scale"], (75, 37), bs))
    ref = codec.encode_(x)
    assert torch.equal(_bits(out["weight"]), _bits(ref))
    deq = codec.dequantize(out, (75, 37), torch.float32, **opts)
    ref_deq = out["weight"].to(torch.float32) * grids.expand_grid(kind, out["weight_scale"], (75, 37), bs)
    assert torch.equal(deq.view(torch.int32), ref_deq.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_table_decode_every_bit_pattern(dtype):
    codec = get_codec("float8_e4m3fn" if dtype == torch.float8_e4m3fn else "float8_e5m2")
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(3, 1)  # 2-D, all 256 patterns
    q = codes.view(dtype)
    got = codec.decode(q)
    ref = q.to(torch.float32)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))  # NaN patterns included, bit for bit


def test_read_into_reused_buffer(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(40, 9, generator=g).to(torch.bfloat16), "b": torch.randn(3, generator=g),
               "c": torch.randint(-5, 5, (7, 2), dtype=torch.int8, generator=g)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    buf = torch.full((1000,), 0xAB, dtype=torch.uint8)
    with SafetensorsReader(path) as r:
        for k, v in tensors.items():
            got = r.read(k, buf)
            assert got.dtype == v.dtype and torch.equal(got, v)
            assert got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        with pytest.raises(ValueError, match="read buffer"):
            r.read("a", torch.empty(10, dtype=torch.uint8))


def test_writer_periodic_write_back(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(64, 17, generator=g) for i in range(6)}
    specs = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    path = tmp_path / "o.safetensors"
    w = AtomicSafetensorsWriter(path, specs, {"k": "v"}, sync_every=5000)  # a flush every ~1-2 tensors
    calls = []
    orig = w._write_back
    w._write_back = lambda: (calls.append(1), orig())
    with w:
        for k in reversed(list(tensors)):  # any order
            w.write(k, tensors[k])
        # Requests coalesce while a flush runs, so at least one runs, in the flusher thread. It may
        # still be waking up now (a loaded machine): a request pending at commit is dropped on
        # purpose, since the closing fsync covers it, so wait for it here rather than race commit.
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
    assert calls
    assert w._flusher is None  # commit waited for it before the closing fsync
    back = load_file(str(path))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_writer_abort_with_write_back_running(tmp_path):
    t = torch.randn(256, 64)
    specs = {f"t{i}": TensorSpec(t.dtype, tuple(t.shape)) for i in range(4)}
    path = tmp_path / "o.safetensors"
    w = AtomicSafetensorsWriter(path, specs, sync_every=1)
    with pytest.raises(RuntimeError, match="boom"):
        with w:
            for k in specs:
                w.write(k, t)
            raise RuntimeError("boom")
    assert w._flusher is None and not path.exists() and not os.path.exists(w.tmp_path)


def test_pipeline_with_single_buffer_and_copied_tensors(tmp_path):
    """prefetch=0: one read buffer, which copied (non-quantized) tensors keep until they are written."""
    g = torch.Generator().manual_seed(2)
    sd = {}
    for i in range(4):
        sd[f"blk.{i}.lin.weight"] = (torch.randn(48, 64, generator=g) * 0.02).to(torch.bfloat16)
        sd[f"blk.{i}.lin.bias"] = torch.randn(48, generator=g).to(torch.bfloat16)
    sd["big.norm"] = torch.randn(5000, generator=g)  # copied unchanged, larger than the weights
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src))
    outs = []
    for prefetch in (0, 1, 3):
        out = tmp_path / f"out{prefetch}.safetensors"
        convert_file(src, out, PlanOptions(), prefetch=prefetch)
        outs.append(load_file(str(out)))
    codec = get_codec("float8_e4m3fn")
    for o in outs:
        assert o.keys() == outs[0].keys()
        for k, v in o.items():
            assert torch.equal(_bits(v), _bits(outs[0][k])), k
        for k, v in sd.items():
            if k.endswith("lin.weight"):
                layer = k[:-len(".weight")]
                ref = codec.quantize(v)
                assert torch.equal(_bits(o[k]), _bits(ref["weight"]))
                assert torch.equal(o[f"{layer}.weight_scale"], ref["weight_scale"])
            else:
                assert torch.equal(o[k], v)


@pytest.mark.parametrize("name,opts", [("float8_e4m3fn_blockwise", {"group_size": 16}),
                                       ("int8_blockwise", {"group_size": 8}),
                                       ("float8_e4m3fn_blockwise", {"group_size": 16, "input_scale": 0.5})])
def test_blockwise_error_in_tile_row_chunks(name, opts):
    """Blockwise layouts are measured in chunks of whole tile rows: same error as one whole dequantization."""
    from hybridquant.converter.error_stats import relative_error

    g = torch.Generator().manual_seed(4)
    w = (torch.randn(203, 50, generator=g) * 0.02).to(torch.bfloat16)  # partial last tile row
    codec = get_codec(name)
    out = codec.quantize(w, **opts)
    whole = codec.dequantize(out, w.shape, torch.float32, **opts)
    ref = float((whole - w.float()).norm() / w.float().norm())
    err, frac = relative_error(codec, out, w, w.shape, opts, chunk_elems=50 * 20)  # 16/8-row multiples
    assert frac == 1.0 and err == pytest.approx(ref, rel=1e-5)
