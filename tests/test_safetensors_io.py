"""The streaming reader and atomic writer against the reference ``safetensors`` library."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hybridquant.converter.errors import InputFileError, OutputFileError
from hybridquant.converter.formats.base import TensorSpec
from hybridquant.converter.safetensors_io import SafetensorsReader, read_header
from hybridquant.converter.safetensors_writer import (
    AtomicSafetensorsWriter,
    clean_stale_partials,
    partial_path,
    write_safetensors,
)


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(17, 33, generator=g).to(torch.bfloat16),
        "a.weight_scale": torch.tensor(0.5),
        "b.f8": torch.randn(8, 8, generator=g).to(torch.float8_e4m3fn),
        "b.f5": torch.randn(3, 5, generator=g).to(torch.float8_e5m2),
        "c.i8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
        "c.u8": torch.arange(11, dtype=torch.uint8),
        "d.f16": torch.randn(2, 3, 4, generator=g).half(),
        "d.i64": torch.arange(5),
        "d.bool": torch.tensor([True, False, True]),
        "e.empty": torch.empty(0, 4),
        "f.f64": torch.randn(3, dtype=torch.float64, generator=g),
    }


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8) if a.numel() else a,
                                                                     b.reshape(-1).view(torch.uint8) if b.numel() else b)


def test_writer_output_reads_in_safetensors(tmp_path):
    t = sample()
    p = tmp_path / "w.safetensors"
    write_safetensors(p, t, {"modelspec.title": "x", "k": "v"})
    back = load_file(str(p))
    assert set(back) == set(t) and all(same(back[k], t[k]) for k in t)
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"modelspec.title": "x", "k": "v"}
    assert (struct.unpack("<Q", p.read_bytes()[:8])[0] + 8) % 8 == 0  # data section 8-byte aligned


def test_reader_reads_safetensors_files(tmp_path):
    t = sample()
    p = tmp_path / "r.safetensors"
    save_file(t, str(p), metadata={"m": "1"})
    infos, md = read_header(p)
    assert md == {"m": "1"} and set(infos) == set(t)
    assert [i.offset for i in infos.values()] == sorted(i.offset for i in infos.values())  # file order
    with SafetensorsReader(p) as r:
        for k in t:
            assert same(r.read(k), t[k]), k


def test_writer_any_order_and_checks(tmp_path):
    t = sample()
    specs = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in t.items()}
    p = tmp_path / "o.safetensors"
    with AtomicSafetensorsWriter(p, specs, {}) as w:
        for k in reversed(list(t)):  # any order: every tensor has a fixed offset
            w.write(k, t[k])
        with pytest.raises(ValueError, match="written twice"):
            w.write("a.weight", t["a.weight"])
    assert all(same(load_file(str(p))[k], t[k]) for k in t)
    p2 = tmp_path / "o2.safetensors"
    with pytest.raises(ValueError, match="header declares"):
        with AtomicSafetensorsWriter(p2, specs) as w:
            w.write("a.weight", t["a.weight"].float())
    assert not p2.exists() and not os.path.exists(partial_path(p2))
    with pytest.raises(RuntimeError, match="never written"):
        with AtomicSafetensorsWriter(p2, specs) as w:
            w.write("a.weight", t["a.weight"])
    assert not p2.exists() and not os.path.exists(partial_path(p2))


def test_exception_leaves_nothing_and_keeps_old_output(tmp_path):
    p = tmp_path / "o.safetensors"
    p.write_bytes(b"old")
    specs = {"x": TensorSpec(torch.float32, (4,))}
    with pytest.raises(OutputFileError, match="exists"):
        AtomicSafetensorsWriter(p, specs).open()
    with pytest.raises(KeyboardInterrupt):
        with AtomicSafetensorsWriter(p, specs, overwrite=True) as w:
            assert os.path.exists(w.tmp_path) and os.path.dirname(w.tmp_path) == str(tmp_path)
            raise KeyboardInterrupt
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["o.safetensors"]


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "model.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".model.safetensors.partial-{dead_pid}"
    stale.write_bytes(b"x")
    alive = tmp_path / f".model.safetensors.partial-{os.getppid()}"  # a live process: kept
    alive.write_bytes(b"x")
    other = tmp_path / f".other.safetensors.partial-{dead_pid}"  # another target: kept
    other.write_bytes(b"x")
    assert clean_stale_partials(target) == [str(stale)]
    assert alive.exists() and other.exists()
    alive.unlink()
    stale.write_bytes(b"x")
    write_safetensors(target, {"x": torch.zeros(2)})  # every writer cleans first
    assert not stale.exists() and target.exists()


@pytest.mark.parametrize("damage,msg", [
    (lambda b: b[:4], "not a safetensors file"),
    (lambda b: struct.pack("<Q", 10**12) + b[8:], "implausible"),
    (lambda b: struct.pack("<Q", len(b)) + b[8:], "truncated"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b[:8] + b"[" + b[9:], "not JSON"),
])
def test_header_validation(tmp_path, damage, msg):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(3)}, str(p))
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(InputFileError, match=msg) as e:
        read_header(p)
    assert str(p) in str(e.value)


def test_inconsistent_offsets_rejected(tmp_path):
    import json

    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(InputFileError, match="do not match"):
        read_header(p)
