"""Per-layer format advice for --dry-run (converter/rounding/advice.py)."""

from __future__ import annotations

import torch

from hybridquant.converter.rounding.advice import advise_layer, advise_layers, format_advice


def test_outlier_rows_get_rowwise_or_block_advice():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.01
    w[:4] *= 200.0  # four rows with a huge range: one tensorwise scale wastes the INT8 grid on them
    adv = advise_layer("blocks.0.fc", w, "int8_tensorwise", {})
    assert adv.advised is not None
    assert adv.advised.error <= 0.75 * adv.planned.error
    assert adv.advised.nbytes <= 1.05 * adv.planned.nbytes
    assert "cuts the error" in adv.text() and "blocks.0.fc" in adv.text()


def test_uniform_layer_gets_no_advice_and_calibrated_error_is_used():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g) * 0.02
    x = torch.randn(256, 64, generator=g)
    stats = {"xtx": x.T @ x / 256}
    adv = advise_layer("a", w, "float8_e4m3fn", {}, stats)
    assert adv.advised is None
    assert 0 < adv.planned.error < 1e-2
    text = format_advice(advise_layers([("a", w, "float8_e4m3fn", {})]))
    assert "no layer of 1" in text




def test_advise_file_reads_the_planned_layers(tmp_path):
    from hybridquant.converter.plan import LayerPlan
    from hybridquant.converter.rounding.advice import advise_file
    from hybridquant.converter.safetensors_writer import write_safetensors

    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=g) * 0.01  # wide enough that per-row scales cost < 5% bytes
    w[:2] *= 300.0
    path = write_safetensors(tmp_path / "m.safetensors", {"a.weight": w, "a.bias": torch.zeros(32)})
    plans = [LayerPlan("a.weight", (32, 256), "float32", "a", "int8_tensorwise", {}, "default"),
             LayerPlan("a.bias", (32,), "float32")]
    adv = advise_file(path, plans)
    assert [a.layer for a in adv] == ["a"] and adv[0].advised is not None
    assert "a: " in format_advice(adv)
