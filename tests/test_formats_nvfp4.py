"""NVFP4 codec: bit-exact against comfy-kitchen (CPU), E2M1 ties, edge cases, rounding contract."""

import comfy_kitchen as ck
import pytest
import torch
from codec_checks import assert_non_finite_refused, assert_rounding_contract
from comfy_kitchen.float_utils import _f32_to_floatx_unpacked

from hybridquant.converter.formats import get_codec
from hybridquant.converter.formats.base import FormatError
from hybridquant.converter.formats.nvfp4 import e2m1_magnitude_index

C = get_codec("nvfp4")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[0])[:, None]).to(dtype)


def _assert_matches_kitchen(w):
    shape = tuple(w.shape)
    t = C.quantize(w)
    s2 = t["weight_scale_2"]
    assert s2.dtype == torch.float32 and s2.shape == ()
    assert float(s2) == float(w.float().abs().amax() / 2688.0)
    q, s = ck.quantize_nvfp4(w, s2, pad_16x=True)
    assert torch.equal(t["weight"], q)
    assert torch.equal(t["weight_scale"].view(torch.uint8), s.view(torch.uint8))
    ours = C.dequantize(t, shape)
    theirs = ck.dequantize_nvfp4(q, s2, s, torch.float32)[: shape[0], : shape[1]]
    assert torch.equal(ours, theirs)
    specs = C.output_specs(shape)
    assert {k: (v.dtype, v.shape) for k, v in specs.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (16, 16), (130, 300), (64, 1024)])
def test_bit_exact_vs_comfy_kitchen(shape, dtype):
    w = _weight(shape, dtype)
    if shape[1] > 20:
        w[1, :16] = 0  # an all-zero block
        w[2, 3] = -0.0
        w[3, 17] = -1e-9  # rounds to "-0": code 8, as comfy-kitchen does
    _assert_matches_kitchen(w)


def test_large_odd_shape_vs_comfy_kitchen():
    _assert_matches_kitchen(_weight((4095, 4097), torch.bfloat16, seed=4))


def test_e2m1_rounding_matches_reference_including_ties():
    vals = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    eps = torch.cat([vals, torch.nextafter(vals, vals + 1), torch.nextafter(vals, vals - 1).clamp(min=0)])
    x = torch.cat([eps, -eps, torch.rand(20000) * 6, -torch.rand(20000) * 6, torch.tensor([-0.0])])
    ref = _f32_to_floatx_unpacked(x.clone(), 2, 1)
    ours = e2m1_magnitude_index(x.abs()) | (torch.signbit(x).to(torch.uint8) << 3)
    assert torch.equal(ours, ref)
    # and through the whole quantizer, with per-element scale exactly 1
    w = torch.zeros(4, 64)
    w[:, 0::16] = 6.0  # block amax 6 -> block scale 1 when the global amax is 2688
    w[0, 1] = 2688.0
    w[1:, 1:16] = vals[None, :15]
    w[1:, 17:32] = -vals[None, :15]
    t = _assert_matches_kitchen(w)
    assert float(t["weight_scale_2"]) == 1.0


def test_zero_tensor_and_outlier():
    z = torch.zeros(17, 33)
    t = C.quantize(z)
    # comfy-kitchen's eager quantize_nvfp4 turns an all-zero tensor (global scale 0) into NaN
    # block scales; we store zeros (block scale 0 decodes to 0).
    assert float(t["weight_scale_2"]) == 0.0
    assert int(t["weight"].max()) == 0 and float(t["weight_scale"].float().abs().max()) == 0.0
    assert torch.equal(C.dequantize(t, (17, 33)), z)
    w = _weight((32, 64))
    w[7, 9] = 1e5  # dominates the global scale: small blocks get subnormal / zero e4m3 scales
    t = _assert_matches_kitchen(w)
    d = C.dequantize(t, (32, 64))
    assert abs(float(d[7, 9]) / 1e5 - 1) < 0.01
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises_naming_tensor(bad):
    w = _weight((8, 40))
    w[0, 0] = bad
    assert_non_finite_refused(C, w, _weight((8, 40)), "double_blocks.0.img_mlp.0.weight")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_contract(dtype):
    w = _weight((19, 70), dtype, seed=1)
    w[2, :16] = 0
    shape = tuple(w.shape)
    p, _, _ = assert_rounding_contract(C, w)
    assert p["weight_scale"].shape == (19, 5) and p["weight_scale_2"].shape == ()
    clipped = C.scale_params(w, amax=C.block_amax(w) * 0.5)
    d = C.dequantize(C.quantize(w, params=clipped), shape)
    assert float((d.abs() / C.element_scale(clipped, shape).clamp_min(1e-30)).max()) == pytest.approx(6.0, rel=1e-6)


def test_validate_errors_name_layer():
    t = C.quantize(_weight((17, 33)))
    C.validate("L", t, (17, 33))
    C.validate("L", {**t, "weight_scale_2": t["weight_scale_2"].reshape(1)}, (17, 33))
    with pytest.raises(FormatError, match="L: missing tensor 'L.weight_scale_2'"):
        C.validate("L", {k: v for k, v in t.items() if k != "weight_scale_2"}, (17, 33))
    with pytest.raises(FormatError, match="L.weight: expected shape"):
        C.validate("L", t, (40, 33))
    with pytest.raises(FormatError, match="L.weight_scale: expected dtype"):
        C.validate("L", {**t, "weight_scale": t["weight_scale"].float()}, (17, 33))
    with pytest.raises(FormatError, match="group_size"):
        C.output_specs((16, 16), group_size=32)
    assert C.metadata() == {"format": "nvfp4"}


def test_stored_scale_params_requantize():
    w = _weight((17, 33))
    q, s = ck.quantize_nvfp4(w, w.abs().amax() / 2688.0, pad_16x=True)
    layer = {"weight": q, "weight_scale": s, "weight_scale_2": w.abs().amax() / 2688.0}
    p = C.stored_scale_params(layer, (17, 33))
    again = C.quantize(C.dequantize(layer, (17, 33)), params=p)
    assert torch.equal(again["weight"], q)
    assert torch.equal(again["weight_scale"].view(torch.uint8), s.view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_cuda_matches_cpu():
    w = _weight((300, 129), torch.bfloat16)
    a, b = C.quantize(w), C.quantize(w.cuda())
    assert all(torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].cpu().reshape(-1).view(torch.uint8)) for k in a)
    assert torch.equal(C.dequantize(b, (300, 129)).cpu(), C.dequantize(a, (300, 129)))


def test_e2m1_value_table_is_built_once_per_device():
    # Building the table per call copied it host->device on every dequantization (and broke CUDA
    # graph capture); it must be one cached tensor per device with the E2M1 values, sign in bit 3.
    from hybridquant.converter.formats import nvfp4

    t = nvfp4._values("cpu")
    assert nvfp4._values(torch.device("cpu")) is t
    expected = torch.tensor(nvfp4.E2M1_VALUES, dtype=torch.float32)
    assert torch.equal(t, torch.cat([expected, -expected]))
    assert torch.signbit(t[8]) and t[8] == 0
