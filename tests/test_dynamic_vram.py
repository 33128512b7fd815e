"""The pack's layers under ComfyUI's dynamic VRAM (ops/dynamic_vram.py), on CPU against the real core.

What runs here is the core's own Python: ``ModelPatcherDynamic.load`` (sizing of every module's virtual
allocation, force loads, buffer loading, LoRA attachment) and ``comfy.ops.cast_modules_with_vbar`` /
``resolve_cast_module_with_vbar`` (fault, copy into the allocation, residency). Only comfy-aimdo's C
library is replaced (it needs a CUDA device): ``HostBuffer`` (unused with pinning off), ``ModelVBAR`` (a
bump allocator over a CPU byte tensor standing in for VRAM) and ``vbar_fault`` (a per-allocation
signature that changes when the test "evicts"). The load runs with ``load_device=meta`` (the core
reroutes a CPU device to the classic patcher), so moved buffers have no data; the restore afterwards
must give the exact outputs again. What only a GPU shows (pages really resident / evicted under a VRAM
cap, peak VRAM, speed) is bench/bench_dynamic_vram.py.

Models: a state dict quantized by the converter (``quantize_state_dict``) per format, all formats incl.
mixed files and svd/rotation extras, two layers over the core's 16 KiB threshold and one under it.
Oracles: the file's own tensors (bytes moved, never converted), ``comfy.memory_management.vram_aligned_size``
for the sizes, and our forward without dynamic VRAM for the outputs (bit-exact: same math).

On a core without the protocol (0.3.75) only the loader tests run: nothing changes there.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytestmark = pytest.mark.comfyui

DIMS = (("big1", 256, 192, True), ("big2", 192, 256, False), ("small", 256, 32, True))
CASES = {
    "fp8": {"mode": "fp8"},
    "fp8_row": {"mode": "fp8", "scaling_mode": "row"},
    "int8_row": {"mode": "int8", "scaling_mode": "row"},
    "mxfp8": {"mode": "mxfp8"},
    "hybrid_mxfp8": {"mode": "hybrid_mxfp8"},
    "nvfp4": {"mode": "nvfp4"},
    "bnb_nf4_dq": {"mode": "bnb4bit", "bnb_quant_type": "nf4", "bnb_double_quant": True},
    "bnb_fp4": {"mode": "bnb4bit", "bnb_quant_type": "fp4"},
    "mixed_nf4_fp8": {"mode": "bnb4bit", "bnb_quant_type": "nf4", "custom_layers": "big2", "custom_type": "fp8"},
    "nf4_svd_hadamard": {"mode": "bnb4bit", "bnb_quant_type": "nf4", "svd_rank": 8, "rotate": "hadamard"},
    "int8_svd": {"mode": "int8", "svd_rank": 8},
}


class Net(torch.nn.Module):
    def __init__(self, ops):
        super().__init__()
        for name, i, o, bias in DIMS:
            setattr(self, name, ops.Linear(i, o, bias=bias))

    def forward(self, x):
        return self.small(torch.nn.functional.gelu(self.big2(torch.nn.functional.gelu(self.big1(x)))))


def _float_sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, i, o, bias in DIMS:
        sd[f"{name}.weight"] = torch.randn(o, i, generator=g) * (0.5 / i ** 0.5)
        if bias:
            sd[f"{name}.bias"] = torch.randn(o, generator=g) * 0.01
    return sd


def _model(case):
    from hybridquant import ops
    from hybridquant.converter import PlanOptions, quantize_state_dict

    file_sd, header, _ = quantize_state_dict(_float_sd(), PlanOptions(**CASES[case]), error_stats=False)
    net = Net(ops.choose_ops(file_sd.keys(), header))
    net.load_state_dict(ops.prepare_state_dict(file_sd, header))
    return net, file_sd


def _same(a, b) -> bool:
    """Same dtype, shape and bytes (torch.equal has no FP8 kernel on CPU)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)))


def _inputs():
    return torch.randn(3, 256, generator=torch.Generator().manual_seed(1))


def _lora(key, o, i, rank=4):
    from comfy.weight_adapter.lora import LoRAAdapter

    g = torch.Generator().manual_seed(7)
    up, down = torch.randn(o, rank, generator=g) * 0.05, torch.randn(rank, i, generator=g) * 0.05
    return {key: LoRAAdapter(set(), (up, down, torch.tensor(float(rank)), None, None, None))}


@pytest.fixture
def dyn(comfy):
    from hybridquant.ops.capabilities import core_dynamic_vram

    if not core_dynamic_vram():
        pytest.skip("this ComfyUI core has no dynamic VRAM (ModelPatcherDynamic); set HYBRIDQUANT_COMFYUI to 0.33")
    return comfy


class FakeVRAM:
    """comfy-aimdo's VBAR stand-in: allocations are slices of one CPU byte tensor; a fault returns a
    per-allocation signature that ``evict`` changes (what aimdo does when it dropped the pages)."""

    def __init__(self, size, device=None):
        self.mem = torch.zeros(int(size), dtype=torch.uint8)
        self.offset, self.gen = 0, {}

    def prioritize(self, *a):
        pass

    def alloc(self, n):
        self.offset = (self.offset + 511) & ~511
        a = (self, self.offset, int(n))
        self.offset += int(n)
        return a

    def free_memory(self, n):
        return 0

    def loaded_size(self):
        return 0

    def evict(self, alloc):
        self.gen[alloc[1]] = self.gen.get(alloc[1], 0) + 1


class FakeHostBuffer:
    def __init__(self, *a, **k):
        self.size = 0


@pytest.fixture
def fake_aimdo(dyn, monkeypatch):
    import comfy.cli_args
    import comfy_aimdo.host_buffer
    import comfy_aimdo.model_vbar
    import comfy_aimdo.torch

    monkeypatch.setattr(comfy_aimdo.host_buffer, "HostBuffer", FakeHostBuffer)
    monkeypatch.setattr(comfy_aimdo.model_vbar, "ModelVBAR", FakeVRAM)
    monkeypatch.setattr(comfy_aimdo.model_vbar, "vbar_fault", lambda a: bytes([a[0].gen.get(a[1], 0)]))
    monkeypatch.setattr(comfy_aimdo.model_vbar, "vbar_unpin", lambda a: None)
    monkeypatch.setattr(comfy_aimdo.torch, "aimdo_to_tensor", lambda a, device: a[0].mem[a[1]:a[1] + a[2]])
    monkeypatch.setattr(comfy.cli_args.args, "disable_pinned_memory", True)


def _dynamic_patcher(net):
    import comfy.model_patcher

    from hybridquant import ops

    mp = comfy.model_patcher.ModelPatcherDynamic(net, load_device=torch.device("meta"), offload_device=torch.device("cpu"))
    assert type(mp) is comfy.model_patcher.ModelPatcherDynamic
    return ops.adopt_patcher(mp)


@pytest.mark.parametrize("case", list(CASES))
def test_dynamic_load_books_stored_bytes(fake_aimdo, case):
    """ModelPatcherDynamic.load on our layers: vbar sized to the stored weight + bias, codec tensors
    force-loaded and counted, the small layer moved as stored, LoRA attached but hidden from the core's
    cast; restoring gives the exact outputs back."""
    import comfy.model_patcher
    from comfy.memory_management import vram_aligned_size
    from comfy.model_management import module_size

    from hybridquant.ops import dynamic_vram

    net, file_sd = _model(case)
    x = _inputs()
    y0 = net(x)
    quantized = {n for n, *_ in DIMS if getattr(net, n).hq_format is not None}
    assert {"big1", "big2"} <= quantized, quantized
    stored = {n: {k: v for k, v in file_sd.items() if k.startswith(n + ".")} for n, *_ in DIMS}
    mp = _dynamic_patcher(net)
    # model_size(): the file's bytes (scales, statistics, svd branch and .comfy_quant included).
    assert mp.model_size() == sum(t.numel() * t.element_size() for t in file_sd.values())
    mp.load(torch.device("meta"))

    resident = 0
    for name, *_ in DIMS:
        m = getattr(net, name)
        resident += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
        if module_size(m) > 16 * 1024:
            assert "_v" in m.__dict__, name
            assert m._v[2] == vram_aligned_size([m.weight, m.bias]), name
            assert m.weight.device.type == "cpu" and _same(m.weight, stored[name][name + ".weight"])
        else:
            assert "_v" not in m.__dict__ and m.weight.device.type == "meta", name
            if m.hq_format is not None:  # moved as stored: not requantized through set_weight
                assert m.weight.dtype == stored[name][name + ".weight"].dtype
            resident += sum(t.numel() * t.element_size() for t in (m.weight, m.bias) if t is not None)
        for b in m.buffers(recurse=False):
            assert b.device.type == "meta"  # every codec tensor besides weight: force-loaded
    assert net.model_loaded_weight_memory == resident
    acc = dynamic_vram.accounting(net)
    assert acc["layers"] == len(quantized)
    assert acc["stored"] == sum(module_size(getattr(net, n)) for n in quantized)

    mp.unpatch_model(torch.device("cpu"))
    assert all(b.device.type == "cpu" for b in net.buffers())
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert torch.equal(net(x), y0)  # restored exactly (the layers keep _v: the core's CPU branch runs)

    # A LoRA: attached by the core as a LowVramPatch, hidden from its cast, applied by the layer.
    lp = mp.clone()
    lp.add_patches(_lora("big1.weight", 192, 256), 1.0)
    lp.load(torch.device("meta"))
    low = net.big1.__dict__["weight_lowvram_function"]
    assert isinstance(low, comfy.model_patcher.LowVramPatch)
    view = dynamic_vram.cast_target(net.big1)
    assert view.weight_lowvram_function is None and len(view.weight_function) == 0
    assert view._v is net.big1._v and view.weight is net.big1.weight
    assert net.big1._hq_functions()[0] is low
    lp.unpatch_model(torch.device("cpu"))


@pytest.mark.parametrize("case", ["fp8", "int8_row", "nvfp4", "bnb_nf4_dq", "nf4_svd_hadamard"])
def test_vbar_cast_moves_codes_and_keeps_them(fake_aimdo, case):
    """The core's fault/copy/resolve on a VbarView: the stored codes land in the allocation untouched, a
    resident second call reuses them, an attached LoRA is never written into them."""
    import comfy.model_patcher
    import comfy.ops
    from comfy.memory_management import vram_aligned_size

    from hybridquant.ops import dynamic_vram

    net, _ = _model(case)
    m = net.big1
    vram = FakeVRAM(1 << 20)
    m._v = vram.alloc(vram_aligned_size([m.weight, m.bias]))
    m._v_signature = None
    # ModelPatcherDynamic.load's pin bookkeeping (pinning is off here); 0.38's cast_modules_with_vbar
    # reads its "fast_disk" entry (0.33 reads args.fast_disk instead and ignores it).
    m._pin_state = {"fast_disk": False}
    m.weight._model_dtype = m.weight.dtype  # what ModelPatcherDynamic.load sets
    m.bias._model_dtype = m.bias.dtype
    patches = _lora("big1.weight", 192, 256)
    m.weight_lowvram_function = comfy.model_patcher.LowVramPatch("big1.weight", {k: [(1.0, v, 1.0, None, None)] for k, v in patches.items()})
    cpu = torch.device("cpu")

    def cast():
        view = dynamic_vram.cast_target(m)
        comfy.ops.cast_modules_with_vbar([view], m.weight.dtype, cpu, torch.float32, False)
        return comfy.ops.resolve_cast_module_with_vbar(view, m.weight.dtype, cpu, torch.float32, None, False)

    w, b = cast()
    base = vram.mem.data_ptr()
    assert base <= w.data_ptr() < base + vram.mem.numel()
    assert _same(w, m.weight) and _same(b, m.bias)
    assert m.__dict__["_v_weight"] is w  # the layer's own residency state
    w.view(torch.uint8).view(-1)[0] ^= 1  # mark the resident copy
    w2, _ = cast()
    assert w2 is w and not _same(w2, m.weight)  # resident: not copied again
    vram.evict(m._v)
    w3, _ = cast()
    assert _same(w3, m.weight)  # evicted: copied again, still the stored codes

    # Negative control, why the view exists: the raw module handed to the core gets its LoRA applied
    # to the stored codes, which never gives the patched logical weight (or raises).
    want = m.weight_lowvram_function(m.hq_dequantize(m.hq_tensors(), torch.float32))
    vram.evict(m._v)
    try:
        comfy.ops.cast_modules_with_vbar([m], m.weight.dtype, cpu, torch.float32, False)
        raw, _ = comfy.ops.resolve_cast_module_with_vbar(m, m.weight.dtype, cpu, torch.float32, None, False)
        right = raw.shape == want.shape and raw.is_floating_point() and torch.allclose(raw.float(), want, atol=1e-4)
    except Exception:  # noqa: BLE001 - a crash is the other way the core's LoRA fails on packed codes
        right = False
    assert not right


@pytest.mark.parametrize("case", ["fp8", "mxfp8", "bnb_nf4_dq", "nf4_svd_hadamard", "mixed_nf4_fp8"])
def test_forward_with_dynamic_state_and_lora(fake_aimdo, case):
    """Our forward on a layer the dynamic patcher set up (``_v`` + LowVramPatch; the core's CPU branch of
    cast_bias_weight): the output is the classic low-VRAM LoRA output, bit for bit, and without the
    patch the plain output."""
    import comfy.model_patcher

    net, _ = _model(case)
    x = _inputs()
    y0 = net(x)
    patches = {k: [(0.8, v, 1.0, None, None)] for k, v in _lora("big1.weight", 192, 256).items()}
    low = comfy.model_patcher.LowVramPatch("big1.weight", patches)
    net.big1.weight_function = [low]  # classic low-VRAM mode's way
    y_classic = net(x)
    net.big1.weight_function = []
    net.big1._v = FakeVRAM(1 << 20).alloc(1 << 16)
    net.big1.weight_lowvram_function = low  # dynamic VRAM's way
    assert torch.equal(net(x), y_classic)
    assert not torch.equal(y_classic, y0)
    net.big1.weight_lowvram_function = None
    assert torch.equal(net(x), y0)


def _sd3_file(tmp_path):
    from e2e.synthetic import sd3_mmdit_state_dict
    from safetensors.torch import save_file

    from hybridquant.converter.convert import convert_file
    from hybridquant.converter.plan import PlanOptions

    src = tmp_path / "plain.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in sd3_mmdit_state_dict(1, seed=3).items()}, str(src))
    out = tmp_path / "fp8.safetensors"
    convert_file(src, out, PlanOptions(mode="fp8"))
    return str(out)


def test_loader_leaves_dynamic_vram_to_the_core(comfy, tmp_path, monkeypatch):
    """0.33: no ``disable_dynamic`` from our loader, a ``cached_patcher_init`` that reloads through it
    (adopted, and with ``disable_dynamic=True`` when the core asks for a non-dynamic delegate).
    0.3.75 (no dynamic VRAM): the same kwargs as before, no reload hook."""
    import comfy.sd

    from hybridquant.nodes import backend
    from hybridquant.ops.capabilities import core_dynamic_vram

    calls = []
    orig = comfy.sd.load_diffusion_model_state_dict

    def spy(sd, **kw):
        calls.append(dict(kw))
        return orig(sd, **kw)

    spy.__signature__ = inspect.signature(orig)  # the loader feature-detects the keyword on it
    monkeypatch.setattr(comfy.sd, "load_diffusion_model_state_dict", spy)
    path = _sd3_file(tmp_path)
    mp, _ = backend.load_diffusion_model(path)
    assert type(mp).__name__.startswith("Hybrid")
    has_kw = "disable_dynamic" in inspect.signature(orig).parameters
    if not core_dynamic_vram():
        assert calls[0].get("disable_dynamic", False) is has_kw
        assert getattr(mp, "cached_patcher_init", None) is None
        return
    assert "disable_dynamic" not in calls[0]
    factory, args, index = mp.cached_patcher_init
    assert factory is backend.load_diffusion_model and args == (path, "auto")
    delegate = factory(*args, disable_dynamic=True)[index]
    assert calls[1]["disable_dynamic"] is True
    assert type(delegate).__name__.startswith("Hybrid") and not delegate.is_dynamic()


def test_dynamic_flag_only_where_the_protocol_is_missing(comfy):
    from hybridquant.nodes import backend
    from hybridquant.ops.capabilities import core_dynamic_vram

    def with_kw(sd, model_options=None, disable_dynamic=False):
        pass

    def without_kw(sd, model_options=None):
        pass

    assert backend._with_dynamic_flag(without_kw, {"a": 1}) == {"a": 1}
    assert backend._with_dynamic_flag(with_kw, {"a": 1}, disable_dynamic=True) == {"a": 1, "disable_dynamic": True}
    want = {"a": 1} if core_dynamic_vram() else {"a": 1, "disable_dynamic": True}
    assert backend._with_dynamic_flag(with_kw, {"a": 1}) == want


def test_view_is_one_per_layer_and_survives_deepcopy(fake_aimdo):
    import copy

    from hybridquant.ops import dynamic_vram

    net, _ = _model("fp8")
    assert dynamic_vram.cast_target(net.big1) is None  # no allocation: the classic carrier
    net.big1._v = FakeVRAM(1 << 16).alloc(1024)
    view = dynamic_vram.cast_target(net.big1)
    assert dynamic_vram.cast_target(net.big1) is view
    view._prefetch = {"x": 1}  # the core's writes land in the layer's state
    assert net.big1._prefetch == {"x": 1}
    del view._prefetch
    assert "_prefetch" not in net.big1.__dict__
    twin = copy.deepcopy(net)
    tv = dynamic_vram.cast_target(twin.big1)
    assert tv is not view and tv.weight is twin.big1.weight and tv.__dict__ is twin.big1.__dict__


@pytest.mark.slow
def test_bench_dynamic_vram_smoke_cpu(dyn, comfyui_path, tmp_path):
    """bench/bench_dynamic_vram.py's shared code path on CPU (tiny Flux, no aimdo: the core reroutes a CPU
    model to the classic patcher, so both rows are classic here; the GPU run is the measurement)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bdv.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo / ".pyroot"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(repo / "bench" / "bench_dynamic_vram.py"), "--comfy", str(comfyui_path), "--smoke-cpu",
           "--formats", "bnb_nf4", "--lora", "--steps", "1", "--warmup", "0", "--work-dir", str(tmp_path / "w"),
           "--json", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["lora"]) for r in rows] == [("dynamic", False), ("classic", False), ("dynamic", True), ("classic", True)]
    for r in rows:
        assert r["step_ms"] > 0 and r["model_size_gb"] > 0 and r["paths"].get("bnb_nf4:dequant", 0) > 0
    assert all(r["rel_err"] == 0.0 for r in rows if r["mode"] == "dynamic")


def test_non_dynamic_delegate_stays_adopted(fake_aimdo):
    """clone(disable_dynamic=True) builds a plain ModelPatcher (hooks, TorchCompileModel): our ON_CLONE
    callback adopts it, so 4-bit LoRA stays on the fly there too."""
    import comfy.model_patcher

    net, _ = _model("bnb_nf4_dq")
    mp = _dynamic_patcher(net)
    delegate = mp.clone(disable_dynamic=True, model_override=mp.get_clone_model_override())
    assert isinstance(delegate, comfy.model_patcher.ModelPatcher) and not delegate.is_dynamic()
    assert type(delegate).__name__ == "HybridModelPatcher"
    assert type(delegate.clone()) is type(delegate)


def test_quantize_node_reads_a_dynamic_model_through_its_delegate(fake_aimdo, monkeypatch):
    """Quantize Model's source weights: ModelPatcherDynamic asserts on force_patch_weights, so a dynamic
    MODEL is read through the core's non-dynamic delegate (a real clone(disable_dynamic=True) here)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    from hybridquant.nodes import quantize_run

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model, _ = _model("fp8")

    mp = _dynamic_patcher(Wrap())
    cpu = torch.device("cpu")
    mp.cached_patcher_init = (lambda disable_dynamic=False: comfy.model_patcher.ModelPatcher(Wrap(), cpu, cpu), ())
    seen = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, **kw: seen.append((models[0], kw)))
    sd = quantize_run._diffusion_state_dict(mp)
    (loaded, kw), = seen
    assert kw == {"force_patch_weights": True} and not loaded.is_dynamic() and loaded is not mp
    assert set(sd) == set(mp.model.diffusion_model.state_dict())


def test_quantize_node_output_can_be_rebuilt(dyn, tmp_path, monkeypatch):
    """The Quantize Model output (in memory, not saved) registers a factory the core can rebuild a
    non-dynamic delegate with (otherwise hooks / TorchCompileModel raise on a dynamic core)."""
    import weakref

    from e2e.synthetic import sd3_mmdit_state_dict
    from safetensors.torch import save_file

    from hybridquant.nodes import backend, quantize_run
    from hybridquant.nodes.quantize import QuantizeModel

    monkeypatch.setattr(quantize_run, "_RESULTS", weakref.WeakValueDictionary())
    monkeypatch.setattr(quantize_run, "_SUMMARIES", {})
    monkeypatch.setattr(quantize_run, "_SAVED", {})
    save_file(sd3_mmdit_state_dict(depth=1, seed=3), str(tmp_path / "tiny.safetensors"))
    model, _ = backend.load_diffusion_model(str(tmp_path / "tiny.safetensors"))
    out = QuantizeModel.execute(model, format="bnb_nf4", preset="none", custom_layers="", custom_format="fp8 tensorwise",
                                rounding="rtn", save=False, filename_prefix="hq_test/tiny")
    qmodel = (out.result if hasattr(out, "result") else out.args)[0]
    factory, args = qmodel.cached_patcher_init
    assert factory is backend.diffusion_model_from_state_dict
    delegate = factory(*args, disable_dynamic=True)
    assert type(delegate).__name__.startswith("Hybrid") and not delegate.is_dynamic()
