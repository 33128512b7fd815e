"""Write faults: a full disk or a file-size limit mid-write, and two writers of one output at once.

Real faults, no mocks: ``RLIMIT_FSIZE`` in a subprocess (the kernel refuses writes past the limit with
EFBIG; Python ignores the SIGXFSZ that comes with it), a tiny tmpfs when this machine lets us mount one
(root), and real concurrent processes.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from convert_helpers import REPO, write_checkpoint

from hybridquant.converter.errors import OutputFileError
from hybridquant.converter.formats.base import TensorSpec
from hybridquant.converter.safetensors_io import read_header
from hybridquant.converter.safetensors_writer import AtomicSafetensorsWriter


def _limited(limit: int):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


def _py(code: str, *args, limit: int | None = None, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, preexec_fn=_limited(limit) if limit else None, **kw)


def _cli(*args, limit: int | None = None):
    return subprocess.run([sys.executable, "-m", "hybridquant.converter", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, preexec_fn=_limited(limit) if limit else None)


def test_file_size_limit_fails_the_conversion_cleanly(tmp_path):
    src = tmp_path / "in.safetensors"
    write_checkpoint(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _cli("-i", src, "-o", out_dir / "m.safetensors", "--fp8", limit=32 * 1024)
    assert proc.returncode == 2, proc.stderr
    assert "file size limit exceeded" in proc.stderr and "no output written" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert os.listdir(out_dir) == []


WRITER = """
import sys, torch
from hybridquant.converter.errors import OutputFileError
from hybridquant.converter.formats.base import TensorSpec
from hybridquant.converter.safetensors_writer import AtomicSafetensorsWriter
specs = {f"t{i}": TensorSpec(torch.float32, (4096,)) for i in range(8)}  # 128 KiB of data
try:
    with AtomicSafetensorsWriter(sys.argv[1], specs, reserve=False) as w:
        for i in range(8):
            w.write(f"t{i}", torch.full((4096,), float(i)))
except OutputFileError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def test_write_error_mid_file_leaves_nothing(tmp_path):
    """Without the up-front reservation, the limit is hit in the middle of the data: still no output."""
    out = tmp_path / "m.safetensors"
    proc = _py(WRITER, out, limit=48 * 1024)
    assert proc.returncode == 2, proc.stderr
    assert "write failed: file size limit exceeded; no output written" in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []
    assert _py(WRITER, out).returncode == 0 and len(read_header(out)[0]) == 8  # and without the limit it works


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_fails_the_conversion_cleanly(tmp_path, tiny_fs):
    src = tmp_path / "in.safetensors"
    write_checkpoint(src)
    proc = _cli("-i", src, "-o", tiny_fs / "m.safetensors", "--fp8")
    assert proc.returncode == 2, proc.stderr
    assert "not enough disk space" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert os.listdir(tiny_fs) == []


def test_full_disk_mid_file_leaves_nothing(tiny_fs):
    proc = _py(WRITER.replace("(4096,)", "(8192,)"), tiny_fs / "m.safetensors")  # 256 KiB > 64 KiB
    assert proc.returncode == 2 and "not enough disk space; no output written" in proc.stderr, proc.stderr
    assert os.listdir(tiny_fs) == []


# ---- concurrent writers --------------------------------------------------------------------------

RACER = """
import os, sys, time, torch
from hybridquant.converter.errors import OutputFileError
from hybridquant.converter.formats.base import TensorSpec
from hybridquant.converter.safetensors_writer import AtomicSafetensorsWriter
out, me, other, value, overwrite = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1"
specs = {f"t{i}": TensorSpec(torch.float32, (1 << 16,)) for i in range(4)}
try:
    w = AtomicSafetensorsWriter(out, specs, overwrite=overwrite).open()
    for i in range(4):
        w.write(f"t{i}", torch.full((1 << 16,), value))
    open(me, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(other) and time.monotonic() < deadline:  # both ready: commit together
        time.sleep(0.001)
    w.commit()
except OutputFileError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_processes_writing_one_output(tmp_path, overwrite):
    out = tmp_path / "m.safetensors"
    if overwrite:
        out.write_bytes(b"old")
    for _ in range(3):
        if not overwrite and out.exists():
            out.unlink()
        for f in tmp_path.glob("ready*"):
            f.unlink()
        a, b = tmp_path / "ready_a", tmp_path / "ready_b"
        env = dict(os.environ)
        procs = [subprocess.Popen([sys.executable, "-c", RACER, str(out), str(me), str(other), str(v), str(int(overwrite))],
                                  cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
                 for me, other, v in ((a, b, 1.0), (b, a, 2.0))]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        codes = sorted(rc for rc, _ in results)
        assert codes == [0, 2], results
        loser = next(err for rc, err in results if rc == 2)
        assert "another process wrote this output" in loser or "appeared while converting" in loser, loser
        winner_value = 1.0 if results[0][0] == 0 else 2.0
        from safetensors.torch import load_file

        got = load_file(str(out))  # complete, and entirely the winner's
        assert len(got) == 4 and all(bool((t == winner_value).all()) for t in got.values())
        leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
        assert leftovers == [], leftovers


def test_two_processes_converting_to_one_output(tmp_path):
    """Two real CLI runs at once: exactly one writes the output, the other exits 2 with a message."""
    src = tmp_path / "in.safetensors"
    write_checkpoint(src)
    out = tmp_path / "out.safetensors"
    procs = [subprocess.Popen([sys.executable, "-m", "hybridquant.converter", "-i", str(src), "-o", str(out), flag],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for flag in ("--fp8", "--int8")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "Traceback" not in loser and "out.safetensors" in loser, loser
    infos, _ = read_header(out)
    assert any(n.endswith(".weight_scale") for n in infos)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    out = tmp_path / "m.safetensors"
    specs = {"t": TensorSpec(torch.float32, (4,))}
    with AtomicSafetensorsWriter(out, specs) as w:
        errors = []

        def second():
            try:
                AtomicSafetensorsWriter(out, specs).open()
            except OutputFileError as e:
                errors.append(str(e))

        th = threading.Thread(target=second)
        th.start()
        th.join()
        assert errors and "another conversion in this process" in errors[0]
        w.write("t", torch.ones(4))
    assert Path(out).exists() and len(read_header(out)[0]) == 1
