"""--dry-run --advise (per-layer format advice) and --calibration with the data-free method."""

from __future__ import annotations

import torch
from convert_helpers import decode, run_cli, write_checkpoint
from safetensors.torch import save_file

from hybridquant.converter.rounding.calibration import collect


def test_dry_run_advises_per_row_scales_for_a_layer_with_outlier_rows(tmp_path):
    src = tmp_path / "in.safetensors"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g) * 0.02
    w[::16] *= 40  # a few rows 40x larger: one tensorwise INT8 scale wastes the grid on the others
    save_file({"blocks.0.fc.weight": w.to(torch.bfloat16), "blocks.1.fc.weight": (torch.randn(256, 128, generator=g) * 0.02).to(torch.bfloat16)},
              str(src))
    proc = run_cli("-i", src, "--int8", "--dry-run", "--advise")
    assert "format advice" in proc.stdout
    advised = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("blocks.0.fc:")]
    assert advised and "per_row=True" in advised[0], proc.stdout
    # the layer with outlier rows gains most, so it is listed first (largest error cut first)
    lines = [ln.strip() for ln in proc.stdout.split("format advice")[1].splitlines() if ln.strip().startswith("blocks.")]
    assert lines[0].startswith("blocks.0.fc:"), proc.stdout
    assert not list(tmp_path.glob("in_*")), "a dry run writes nothing"
    # without --advise the dry run stays a header-only plan and says how to get advice
    plain = run_cli("-i", src, "--int8", "--dry-run")
    assert "add --advise" in plain.stdout and "format advice (" not in plain.stdout
    bad = run_cli("-i", src, "--int8", "--advise", check=False)
    assert bad.returncode == 2 and "--advise only works with --dry-run" in bad.stderr


def test_calibration_file_missing_layers_is_fine_for_the_data_free_method(tmp_path):
    """Statistics are only read for gptq layers: a partial file must not fail a --method default run."""
    src = tmp_path / "in.safetensors"
    write_checkpoint(src)
    lin = torch.nn.Linear(128, 128)
    net = torch.nn.ModuleDict({"double_blocks": torch.nn.ModuleList([torch.nn.ModuleDict({"img_attn": torch.nn.ModuleDict({"proj": lin})})])})
    col = collect(net, [torch.randn(8, 128)], forward=lambda m, x: m["double_blocks"][0]["img_attn"]["proj"](x))
    calib = col.save(tmp_path / "partial_calib.safetensors")
    out = tmp_path / "out.safetensors"
    run_cli("-i", src, "-o", out, "--int8", "--method", "default", "--calibration", calib)
    infos, deq, _, _ = decode(out)
    assert infos and all(torch.isfinite(d).all() for d in deq.values())
    # gptq on the same file names the layers that have no statistics, before writing anything
    out2 = tmp_path / "out2.safetensors"
    bad = run_cli("-i", src, "-o", out2, "--int8", "--method", "gptq", "--calibration", calib, check=False)
    assert bad.returncode != 0 and "img_mlp" in bad.stderr and not out2.exists()
