"""The seeded mutation fuzzer of ``fuzz_helpers.py``, bounded for CI.

``HYBRIDQUANT_FUZZ_CASES`` (default 3000, about 15 s) or ``HYBRIDQUANT_FUZZ_SECONDS`` run it longer;
``HYBRIDQUANT_FUZZ_SEED`` picks the seed (default: a fixed one, so a failure reproduces). It runs in a
subprocess because it lowers its own address-space limit (a lying size must fail to allocate, loudly).
Failing cases are kept under the test's temp dir and listed in the assertion message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.comfyui  # the file summary of the web panel lives in nodes/ (imports comfy_api)


def test_fuzz_every_reader(tmp_path, comfyui_path):
    seconds = os.environ.get("HYBRIDQUANT_FUZZ_SECONDS")
    cases = os.environ.get("HYBRIDQUANT_FUZZ_CASES", "3000")
    seed = os.environ.get("HYBRIDQUANT_FUZZ_SEED", "13")
    args = ["--seconds", seconds] if seconds else ["--cases", cases]
    env = dict(os.environ, HYBRIDQUANT_COMFYUI=str(comfyui_path))
    proc = subprocess.run([sys.executable, str(HERE / "fuzz_helpers.py"), *args, "--seed", seed, "--work", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=3600)
    assert proc.stdout.strip(), proc.stderr[-4000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: v for k, v in stats.items() if k != "failures"})
    shown = json.dumps(stats["failures"][:10], indent=1)
    assert stats["uncaught"] == 0, shown
    assert stats["hangs"] == 0, shown
    assert stats["oversize"] == 0, shown
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The fuzzer must reach past the container checks: both outcomes, every kind of mutation.
    assert stats["mutations"] >= min(int(cases), 100) if not seconds else stats["mutations"] > 0
    assert stats["refused"] > 0 and stats["accepted"] > 0
    assert set(stats["by_kind"]) == {"header", "quant_header", "comfy_quant", "quant_state", "tensors"}
