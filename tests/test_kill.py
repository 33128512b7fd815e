"""Killing a conversion mid-way never loses data.

A real ``convert_to_quant`` process converts a ~150 MB checkpoint; once its progress output shows it is
past 10 % (the temp file exists and holds data) it gets SIGINT / SIGTERM / SIGKILL.
- SIGINT / SIGTERM: exit 130, no output file, no temp file, input unchanged (hash).
- SIGKILL: no cleanup code can run, so the temp file ``.<output>.partial-<pid>`` may stay, but nothing
  exists at the output path and the input is unchanged; the next run removes the dead process's temp
  file and succeeds.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from convert_helpers import REPO

pytestmark = pytest.mark.slow


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    from hybridquant.converter.formats.base import TensorSpec
    from hybridquant.converter.safetensors_writer import AtomicSafetensorsWriter

    d = tmp_path_factory.mktemp("kill")
    p = d / "big.safetensors"
    g = torch.Generator().manual_seed(0)
    specs = {f"blocks.{i}.mlp.weight": TensorSpec(torch.bfloat16, (3072, 1024)) for i in range(24)}  # 151 MB
    with AtomicSafetensorsWriter(p, specs) as w:
        for n in specs:
            w.write(n, (torch.randn(3072, 1024, generator=g) * 0.02).to(torch.bfloat16))
    return p, sha(p)


def start(src, out):
    # the default rounding method (a clipping search) keeps the run long enough to be interrupted
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "hybridquant.converter", "-i", str(src), "-o", str(out), "--int8",
                             "--scaling_mode", "row"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    lines: list[str] = []
    started = threading.Event()

    def pump():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("converting:") and not line.startswith("converting:   0.0%"):
                started.set()

    threading.Thread(target=pump, daemon=True).start()
    assert started.wait(120), "".join(lines)
    partial = out.parent / f".{out.name}.partial-{proc.pid}"
    assert partial.exists() and proc.poll() is None, "conversion finished before it could be interrupted"
    return proc, partial, lines


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_no_output(big, tmp_path, sig):
    src, digest = big
    out = tmp_path / "out.safetensors"
    proc, partial, lines = start(src, out)
    proc.send_signal(sig)
    rc = proc.wait(60)
    time.sleep(0.1)
    assert rc == 130, "".join(lines)
    assert not out.exists() and not partial.exists()
    assert os.listdir(tmp_path) == []
    assert "no output written" in "".join(lines)
    assert sha(src) == digest


def test_sigkill_leaves_no_output_and_next_run_cleans(big, tmp_path):
    src, digest = big
    out = tmp_path / "out.safetensors"
    proc, partial, _ = start(src, out)
    proc.kill()
    assert proc.wait(60) == -signal.SIGKILL
    assert not out.exists()
    assert sha(src) == digest
    assert os.listdir(tmp_path) == [partial.name]  # the only trace, named after the dead pid
    # the next run removes the dead process's temp file (dry run first: it must not touch anything)
    subprocess.run([sys.executable, "-m", "hybridquant.converter", "-i", str(src), "-o", str(out), "--dry-run"],
                   cwd=REPO, check=True, capture_output=True)
    assert partial.exists()
    subprocess.run([sys.executable, "-m", "hybridquant.converter", "-i", str(src), "-o", str(out), "--simple", "-q"],
                   cwd=REPO, check=True, capture_output=True)
    assert not partial.exists() and out.exists()
    assert os.listdir(tmp_path) == [out.name]
    assert sha(src) == digest
