"""User errors: a clear one-line message on stderr naming the problem, exit code 2, no traceback, no
output file and no temp file left behind, the input unchanged."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from convert_helpers import run_cli, write_checkpoint
from safetensors.torch import save_file


@pytest.fixture()
def src(tmp_path):
    p = tmp_path / "in.safetensors"
    write_checkpoint(p)
    return p


def fails(*args, match: str, subprocess_: bool = False):
    proc = run_cli(*args, check=False, subprocess_=subprocess_)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert match in proc.stderr, proc.stderr
    return proc


def no_outputs(d):
    return [p.name for p in d.iterdir() if p.name.startswith(".") or p.name.startswith("out")]


def test_missing_input(tmp_path):
    fails("-i", tmp_path / "nope.safetensors", "-o", tmp_path / "out.safetensors", match="does not exist",
          subprocess_=True)  # once through a real process: exit status and stderr as a user sees them
    assert no_outputs(tmp_path) == []


def test_not_safetensors_and_truncated(tmp_path, src):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint at all")
    fails("-i", junk, "-o", tmp_path / "out.safetensors", match="not a safetensors file")
    data = src.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    fails("-i", trunc, "-o", tmp_path / "out.safetensors", match="truncated")
    trunc.write_bytes(data[:20])
    fails("-i", trunc, "-o", tmp_path / "out.safetensors", match="truncated")
    fails("-i", tmp_path, "-o", tmp_path / "out.safetensors", match="is a directory")
    assert no_outputs(tmp_path) == []


def test_unreadable_input(tmp_path, src):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    src.chmod(0)
    try:
        fails("-i", src, "-o", tmp_path / "out.safetensors", match="cannot read")
    finally:
        src.chmod(0o644)


@pytest.mark.parametrize("flag", ["--exclude-layers", "--custom-layers"])
def test_invalid_regex_names_flag(tmp_path, src, flag):
    extra = ["--custom-type", "fp8"] if flag == "--custom-layers" else []
    fails("-i", src, "-o", tmp_path / "out.safetensors", flag, "blocks.(", *extra, match=f"{flag}: invalid regex 'blocks.('")


def test_bad_layer_config(tmp_path, src):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"img_in": {"format": "fp9"}}))
    fails("-i", src, "-o", tmp_path / "out.safetensors", "--layer-config", cfg, match="unknown format 'fp9'")
    cfg.write_text(json.dumps({"img_in[": "fp8"}))
    fails("-i", src, "-o", tmp_path / "out.safetensors", "--layer-config", cfg, match="invalid regex 'img_in['")
    cfg.write_text("{not json")
    fails("-i", src, "-o", tmp_path / "out.safetensors", "--layer-config", cfg, match="invalid JSON")
    cfg.write_text(json.dumps({"img_in": {"format": "fp8", "colour": 1}}))
    fails("-i", src, "-o", tmp_path / "out.safetensors", "--layer-config", cfg, match="unknown keys ['colour']")
    fails("-i", src, "-o", tmp_path / "out.safetensors", "--layer-config", tmp_path / "none.json", match="file not found")


def test_custom_layers_without_type(tmp_path, src):
    fails("-i", src, "-o", tmp_path / "out.safetensors", "--custom-layers", "x", match="--custom-layers needs --custom-type")


def test_output_exists_and_overwrite(tmp_path, src):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    fails("-i", src, "-o", out, match="output file exists")
    assert out.read_bytes() == b"precious"
    run_cli("-i", src, "-o", out, "-q", "--simple", "--overwrite")
    assert out.stat().st_size > 100


def test_output_is_input(tmp_path, src):
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    fails("-i", src, "-o", src, match="output is the input")
    fails("-i", src, "-o", src, "--overwrite", match="output is the input")
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    fails("-i", src, "-o", link, "--overwrite", match="output is the input")
    fails("-i", link, "-o", src, "--overwrite", match="output is the input")
    hard = tmp_path / "hard.safetensors"
    os.link(src, hard)
    fails("-i", hard, "-o", src, "--overwrite", match="output is the input")
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_layer(tmp_path, bad):
    w = {"ok.weight": torch.randn(64, 64), "blocks.3.attn.qkv.weight": torch.randn(64, 64)}
    w["blocks.3.attn.qkv.weight"][5, 7] = bad
    p = tmp_path / "in.safetensors"
    save_file(w, str(p))
    fails("-i", p, "-o", tmp_path / "out.safetensors", "--simple", match="blocks.3.attn.qkv")
    assert no_outputs(tmp_path) == []


def test_unknown_device_and_conflicts(tmp_path, src):
    fails("-i", src, "-o", tmp_path / "out.safetensors", "--device", "tpu9", match="--device")
    fails("-i", src, "-o", tmp_path / "out.safetensors", "--tensor-scales", src, match="--tensor-scales")
    fails("-i", src, "-o", tmp_path / "out.safetensors", "--add-keys", "a=1", match="--edit-quant")
    fails("-o", tmp_path / "out.safetensors", match="-i/--input is required")


def test_hybrid_on_file_without_mxfp8(tmp_path, src):
    """--make-hybrid-mxfp8 on a file with no MXFP8 layers (the library is converter-edit's)."""
    fp8 = tmp_path / "fp8.safetensors"
    run_cli("-i", src, "-o", fp8, "-q", "--simple")
    fails("-i", fp8, "-o", tmp_path / "out.safetensors", "--make-hybrid-mxfp8", match="MXFP8")
    fails("-i", src, "-o", tmp_path / "out.safetensors", "--make-hybrid-mxfp8", match="MXFP8")


def test_option_errors_before_output_errors(tmp_path, src):
    """A bad option is named even when the output also exists (the plan reads the header only), and a
    size budget, which reads every weight, refuses an existing output before that work."""
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"x")
    fails("-i", src, "-o", out, "--custom-layers", "(", "--custom-type", "fp8", match="--custom-layers: invalid regex")
    proc = fails("-i", src, "-o", out, "--target-bpw", "8", match="output file exists")
    assert "size-budget plan" not in proc.stdout, proc.stdout
    assert out.read_bytes() == b"x"


def test_missing_output_dir(tmp_path, src):
    fails("-i", src, "-o", tmp_path / "no" / "such" / "out.safetensors", match="does not exist")


def test_output_too_large_for_the_disk(tmp_path):
    """A write that cannot fit (here: a 1 MB file-size limit standing in for a full disk) fails up front
    with a clear error, leaves no output or temp file, and the input is untouched."""
    import resource
    import signal
    import subprocess
    import sys

    from convert_helpers import REPO

    src = tmp_path / "in.safetensors"
    save_file({"blocks.0.mlp.weight": torch.randn(1024, 1024)}, str(src))  # 4 MB in, 1 MB out
    digest = hashlib.sha256(src.read_bytes()).hexdigest()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))

    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-m", "hybridquant.converter", "-i", str(src), "-o", str(out), "--simple"],
                          cwd=REPO, capture_output=True, text=True, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and str(out) in proc.stderr
    assert any(m in proc.stderr for m in ("disk space", "size limit", "write failed"))
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
