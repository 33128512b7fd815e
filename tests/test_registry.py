"""Adding a format is one module plus one registry line (ARCHITECTURE.md, "Adding a format").

A throwaway format is registered in a fixture -- a real codec (7-bit symmetric integers, one scale per
output row, stored in int8) with its spec, and nothing else anywhere -- and followed through the
planner, the CLI, the streaming converter, discovery/validation, file info, the ops dispatch and a
real ComfyUI layer. If any of those kept its own table of formats, the new name would be missing there.
"""

from __future__ import annotations

import pytest
import torch
from convert_helpers import decode, run_cli, write_checkpoint

from hybridquant.converter import inspect_file
from hybridquant.converter import metadata as qmeta
from hybridquant.converter.formats import registry
from hybridquant.converter.formats.grids import GridCodec
from hybridquant.converter.formats.spec import FormatSpec, Variant
from hybridquant.converter.plan import Planner, PlanOptions, custom_types, primary_modes, resolve_format

NAME, FAMILY = "toy_int7_rowwise", "toy7"


class ToyInt7(GridCodec):
    """int8 storage of the grid -63..63, one float32 scale per row ([M, 1]) = row amax / 63."""

    spec = FormatSpec(name=NAME, label="Toy INT7", family=FAMILY, color="#123456",
                      summary="7-bit test format", variants=(Variant("", "Toy INT7 (per row)"),),
                      scale_out=True, clipping=True, aliases=("toy",))
    storage = torch.int8
    qmax = 63.0

    def layout(self, opts, tensors=None):
        return "row1", 0

    def encode_(self, x):
        return x.round_().clamp_(-63, 63).to(torch.int8)


@pytest.fixture
def toy_format():
    registry.register(ToyInt7())
    try:
        yield NAME
    finally:
        registry.unregister(NAME)


def test_registry_lookups_derive_from_specs(toy_format):
    assert NAME in registry.format_names() and FAMILY in primary_modes() and FAMILY in custom_types()
    assert registry.get_spec(NAME).label == "Toy INT7"
    assert abs(registry.bits_per_weight(NAME) - (8 + 32 / 3072)) < 1e-9  # int8 codes + one f32 per row
    assert (NAME, "") in [(s.name, v.key) for s, v in registry.choices()]
    assert resolve_format(FAMILY) == (NAME, {}) and resolve_format(NAME) == (NAME, {})
    p = Planner(PlanOptions(mode=FAMILY)).plan("blk.lin.weight", (64, 48), "bfloat16")
    assert p.format == NAME and p.reason == "primary mode"
    # a registered name is a known .comfy_quant format; an unknown one still is not
    assert qmeta.check_layer_dict({"format": NAME}, "x") == {"format": NAME}
    with pytest.raises(qmeta.FormatError, match="unknown quantization format"):
        qmeta.check_layer_dict({"format": NAME + "_nope"}, "x")


def test_searchable_name_words_come_from_the_specs(toy_format):
    """The words the web extension puts in front of the node names (name-only search frontends) are
    ``FormatSpec.name_word``s: by default a format's family when its label starts with it."""
    from dataclasses import replace

    words = registry.name_words()
    assert "nf4" in words and "mxfp8" in words  # nf4: set on the spec (family bnb4bit)
    assert "fp8" not in words  # found through "mxfp8"
    assert "w4a8" not in words and "hybrid" not in words  # labels that do not start with their family
    assert not any(o != w and w in o for w in words for o in words)
    assert registry.get_spec(NAME).search_name_word() == ""  # "Toy INT7" of family toy7

    class Named(ToyInt7):
        spec = replace(ToyInt7.spec, name="toy7_named", label="TOY7 named")

    class Silent(ToyInt7):
        spec = replace(ToyInt7.spec, name="toy7_silent", label="TOY7X silent", family="toy7x", name_word="")

    registry.register(Named())
    registry.register(Silent())
    try:
        assert registry.name_words() == [*words, "toy7"]
    finally:
        registry.unregister("toy7_named")
        registry.unregister("toy7_silent")
    assert registry.name_words() == words


def test_new_format_flows_through_cli_convert_discovery_and_file_info(toy_format, tmp_path):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    w = write_checkpoint(src)
    run_cli("-i", src, "-o", out, f"--{FAMILY}", "--simple", "-q")
    infos, tensors, meta, _ = decode(out)
    toy = [layer for layer, i in infos.items() if i.format == NAME]
    assert toy and len(toy) == len(infos)
    codec = registry.get_codec(NAME)
    for layer in toy:  # the file holds exactly the codec's round trip of each weight (RTN)
        torch.testing.assert_close(tensors[layer], codec.fake_quantize(w[f"{layer}.weight"]), rtol=0, atol=0)
    assert set(qmeta.parse_header(meta)) == set(toy)
    fi = inspect_file(out)
    assert fi.formats()[NAME] == len(toy)
    layer = next(d for d in fi.layers if d.format == NAME)
    assert layer.quantized and layer.shape == tuple(w[f"{layer.name}.weight"].shape)


@pytest.mark.comfyui
def test_new_format_loads_and_runs_in_comfyui(toy_format, comfy):
    from ops_helpers import Tiny, float_weights, inputs

    from hybridquant import ops
    from hybridquant.ops import dispatch

    assert dispatch.kernel_for(NAME, "cpu") == dispatch.DEQUANT
    fw = float_weights()
    codec = registry.get_codec(NAME)
    sd, ref = {}, {}
    for key, t in fw.items():
        if key.endswith(".weight"):
            layer = key[: -len(".weight")]
            q = codec.quantize(t)
            sd.update({f"{layer}.{k}": v for k, v in q.items()})
            sd[f"{layer}.comfy_quant"] = qmeta.encode_comfy_quant(codec.metadata())
            ref[key] = codec.dequantize(q, tuple(t.shape))
        else:
            sd[key] = ref[key] = t
    m = Tiny(ops.HybridQuantOps)
    m.load_state_dict(ops.prepare_state_dict(sd, None))
    assert m.a.hq_format == NAME and m.a.weight.dtype == torch.int8
    import comfy.ops

    r = Tiny(comfy.ops.manual_cast)
    r.load_state_dict(ref)
    x = inputs()
    torch.testing.assert_close(m(x), r(x), rtol=1e-5, atol=1e-5)
