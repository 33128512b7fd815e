"""What a user sees in the real ComfyUI page (headless chromium, real 0.3.75 server), in BOTH node
renderers: the classic LiteGraph canvas and the Vue node renderer (frontend setting
``Comfy.VueNodes.Enabled``; the installed frontend 1.32.9 has it). One page per renderer; every test
asserts the text of the pack's panels (a DOM element both renderers show), the frontend's own error
attribution, node titles and search, and saves screenshots to artifacts/e2e-ui-<renderer>-*.png.

Issue 12's points, by test: 1 info_node, 2 validation, 3 zero_layer, 4 symlink, 5 stock_hint,
6 choices, 7 panel (and 3 for "cleared on failure"), 8 search, 11 example_workflows.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from .conftest import ARTIFACTS
from .harness import REPO

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow]

EXAMPLE = "hybridquant_example_sd3_tiny.safetensors"
MIXED, FP8, MX, LINK = "hq_ui_mixed.safetensors", "hq_ui_fp8.safetensors", "hq_ui_mx.safetensors", "hq_ui_link.safetensors"


@pytest.fixture(scope="module")
def files(comfy_server, comfy, tmp_path_factory):
    """Quantized variants of the bundled example in the server's diffusion_models, and a symlink to a
    copy on "another disk" (outside every model folder), as users keep big models."""
    from hybridquant.converter.convert import convert_file
    from hybridquant.converter.plan import PlanOptions

    dm = comfy_server.models("diffusion_models")
    src = REPO / "examples" / EXAMPLE
    for name, opts in ((MIXED, PlanOptions(mode="bnb4bit", custom_layers=r"attn\.qkv", custom_type="fp8", method="rtn")),
                       (FP8, PlanOptions(mode="fp8", method="rtn")), (MX, PlanOptions(mode="mxfp8", method="rtn"))):
        if not (dm / name).exists():
            convert_file(src, dm / name, opts)
    other_disk = tmp_path_factory.mktemp("other_disk")
    shutil.copy(src, other_disk / "big_model.safetensors")
    if not (dm / LINK).exists():
        os.symlink(other_disk / "big_model.safetensors", dm / LINK)
    return dm


@pytest.fixture(scope="module", params=["classic", "vue"])
def ui(request, comfy_server, files):
    from .ui import UI

    page = UI(comfy_server, request.param)
    yield page
    (ARTIFACTS / f"e2e-ui-{request.param}-console.json").write_text(
        json.dumps({"console": page.page.console, "exceptions": page.page.exceptions}, indent=1))
    ours = [e for e in page.page.exceptions + [c for c in page.page.console if c["level"] == "error"]
            if any("/extensions/ComfyUI-HybridQuant/" in (f or "") for f in e.get("frames", []))]
    page.close()
    assert not ours, ours


def _quantize(ui, src_widgets=None, pos=(420, 60), **widgets):
    src = ui.add("UNETLoader", (40, 60), {"unet_name": EXAMPLE, **(src_widgets or {})})
    q = ui.add("HybridQuantQuantizeModel", pos, {"save": False, "rounding": "rtn", **widgets})
    ui.connect(src, 0, q, "model")
    return src, q


def _set_choice(ui, node_id, widget, prefix):
    return ui.js("""(() => { const w = window.app.graph.getNodeById(%d).widgets.find(w => w.name === %s);
        w.value = w.options.values.find(v => v.startsWith(%s)); w.callback && w.callback(w.value); return w.value; })()"""
                 % (node_id, json.dumps(widget), json.dumps(prefix)))


def test_info_node(ui):
    """1: Quantization Info shows its result ON the node: a per-layer table (names, formats, shapes,
    sizes) before running (from the header) and after the run (its UI output)."""
    ui.clear()
    n = ui.add("HybridQuantInfo", (40, 40), {"file": f"diffusion_models/{MIXED}"})
    ui.wait(f"window.app.graph.getNodeById({n}).__hqPanel.dataset.state === 'ok'")
    before = ui.panel_text(n)
    assert "joint_blocks.0.x_block.attn.qkv" in before and "384 × 128" in before, before
    assert "NF4 ×" in before and "FP8 ×" in before
    assert ui.queue() == {"ok": True}
    ui.wait_idle()
    ui.wait(f"window.app.graph.getNodeById({n}).__hqPanel.dataset.state === 'done'")
    text = ui.panel_text(n)
    assert "joint_blocks.1.x_block.mlp.fc2" in text and "layer" in text and "shape" in text, text
    assert ui.panel_visible(n)
    assert ui.shot("1-info-node").stat().st_size > 10_000


def test_validation(ui, comfy_server):
    """2: one bad regex = ONE error, on custom_layers (ComfyUI's frontend marks that input), shown in
    the panel too; a bad combo value is caught by ComfyUI's own check, on its input; nothing ran."""
    ui.clear()
    _, q = _quantize(ui, custom_layers="attn((")
    res = ui.queue()
    errors = res["error"]["node_errors"][str(q)]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["custom_layers"], errors
    assert "invalid regex" in errors[0]["details"]
    ui.wait(f"window.app.graph.getNodeById({q}).__hqPanel.dataset.state === 'invalid'")
    assert "custom_layers: invalid regex" in ui.panel_text(q)
    if ui.renderer == "classic":
        flagged = ui.js(f"window.app.graph.getNodeById({q}).inputs.filter(i => i.hasErrors).map(i => i.name)")
        assert flagged == ["custom_layers"], flagged
    else:
        # the Vue renderer marks each input with an error: frontend 1.32 rings its socket (InputSlot:
        # "ring-error"); 1.49 draws the widget's label in red bold ("text-node-stroke-error"; its socket
        # ring, "before:ring-error", sits in a socket column that stays transparent until hovered)
        flagged = ui.wait("""(() => { const n = document.querySelector('[data-node-id="%d"]'); if (!n) return null;
            const e = [...n.querySelectorAll('.ring-error, .text-node-stroke-error')].map(x => {
                const row = x.closest('.lg-node-widget'); return row ? row.innerText.trim().split('\\n')[0] : '?'; });
            return e.length ? [...new Set(e)] : null; })()""" % q, 20)
        assert flagged == ["custom_layers"], flagged
    ui.shot("2-validation-dialog", keep_dialogs=True)
    ui.shot("2-validation")
    # the page cannot pick a value outside a combo's list; an API prompt can: ComfyUI's own check
    # (kept: validate_inputs takes only custom_layers) refuses it, on that input, before anything loads
    prompt = ui.js("window.app.graphToPrompt().then(p => p.output)")
    prompt[str(q)]["inputs"].update(custom_layers="", rounding="no_such_rounding")
    status, body = comfy_server.request("POST", "/prompt", {"prompt": prompt})
    assert status == 400, (status, json.dumps(body)[:2000])
    errors = body["node_errors"][str(q)]["errors"]
    assert status == 400 and [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [
        ("value_not_in_list", "rounding")], errors


def test_zero_layer(ui):
    """3 and 7: an fp8-loaded model (UNETLoader weight_dtype) quantizes nothing: an error on the node
    that says why; a regex that matches nothing is a warning; a later failure clears the old result."""
    ui.clear()
    src, q = _quantize(ui, {"weight_dtype": "fp8_e4m3fn"})
    assert ui.queue() == {"ok": True}
    ui.wait_idle()
    ui.wait(f"window.app.graph.getNodeById({q}).__hqPanel.dataset.state === 'error'")
    text = ui.panel_text(q)
    assert "nothing to quantize" in text and "weight_dtype" in text, text
    ui.shot("3-zero-layers")
    ui.js(f"window.app.graph.getNodeById({src}).widgets.find(w => w.name === 'weight_dtype').value = 'default'; true")
    ui.js(f"window.app.graph.getNodeById({q}).widgets.find(w => w.name === 'custom_layers').value = 'no_such_layer'; true")
    assert ui.queue() == {"ok": True}
    ui.wait_idle()
    ui.wait(f"window.app.graph.getNodeById({q}).__hqPanel.dataset.state === 'done'")
    text = ui.panel_text(q)
    assert text.startswith("Quantized") and "custom_layers 'no_such_layer' matched no layer" in text, text
    ui.js(f"window.app.graph.getNodeById({src}).widgets.find(w => w.name === 'weight_dtype').value = 'fp8_e4m3fn'; true")
    assert ui.queue() == {"ok": True}
    ui.wait_idle()
    ui.wait(f"window.app.graph.getNodeById({q}).__hqPanel.dataset.state === 'error'")
    assert "Quantized" not in ui.panel_text(q)


def test_symlink(ui):
    """4: a model file reached through a symlink in the model folder (the file lives elsewhere) shows
    its summary and loads in our loader, as it does in the stock one."""
    ui.clear()
    ld = ui.add("HybridQuantLoadDiffusionModel", (40, 60), {"unet_name": LINK})
    ui.wait(f"window.app.graph.getNodeById({ld}).__hqPanel.dataset.state === 'ok'")
    ui.js(f"window.app.graph.getNodeById({ld}).__hqPanel.querySelector('details').open = true; true")
    text = ui.panel_text(ld)
    assert text.startswith(LINK) and "not quantized" in text and "joint_blocks.0.x_block.attn.qkv" in text, text
    q = ui.add("HybridQuantQuantizeModel", (440, 60), {"save": False, "rounding": "rtn"})
    ui.connect(ld, 0, q, "model")
    assert ui.queue() == {"ok": True}
    ui.wait_idle()
    ui.wait(f"window.app.graph.getNodeById({q}).__hqPanel.dataset.state === 'done'")
    assert ui.panel_text(q).startswith("Quantized")
    ui.shot("4-symlink")


def test_stock_hint(ui, comfy_server):
    """5: whether stock ComfyUI loads a file comes from the running core's QUANT_ALGOS (0.3.75: FP8
    names only), and an unquantized file gets no "fast path" verdict."""
    status, caps = comfy_server.get("/hybridquant/capabilities")
    assert status == 200 and "float8_e4m3fn" in caps["core_formats"]
    core_mx = "mxfp8" in caps["core_formats"]  # 0.3.75: no; 0.33: yes (its QUANT_ALGOS has mxfp8)
    ui.clear()
    ids = {name: ui.add("HybridQuantLoadDiffusionModel", (40 + 420 * i, 60), {"unet_name": name})
           for i, name in enumerate((FP8, MX, EXAMPLE))}
    for n in ids.values():
        ui.wait(f"window.app.graph.getNodeById({n}).__hqPanel.dataset.state === 'ok'")
    assert "this ComfyUI's stock loaders read it too" in ui.panel_text(ids[FP8])
    if core_mx:
        assert "this ComfyUI's stock loaders read it too" in ui.panel_text(ids[MX])
    else:
        assert "needs the HybridQuant loaders: this ComfyUI does not know MXFP8" in ui.panel_text(ids[MX])
    plain = ui.panel_text(ids[EXAMPLE])
    assert "not quantized: runs as in stock ComfyUI" in plain and "fast path" not in plain, plain
    assert "dequantize per layer" in ui.panel_text(ids[MX])  # CPU server: the path ops really take
    ui.shot("5-stock-hint")


def test_choices(ui):
    """6: plain-language options from the registry (bits per weight), the default for this device (CPU:
    NF4), Hybrid MXFP8 offered, no no-op ops choice on loaders, old option values mapped, and a
    preview of the plan (which layer becomes what, why the rest is kept) before anything runs."""
    ui.clear()
    _, q = _quantize(ui)
    opts = ui.js(f"window.app.graph.getNodeById({q}).widgets.find(w => w.name === 'format').options.values")
    assert all("bits/weight" in o for o in opts) and any(o.startswith("Hybrid MXFP8") for o in opts), opts
    assert ui.js(f"window.app.graph.getNodeById({q}).widgets.find(w => w.name === 'format').value").startswith("NF4")
    ld = ui.add("HybridQuantLoadDiffusionModel", (1080, 60), {"unet_name": EXAMPLE})
    assert "ops" not in ui.js(f"window.app.graph.getNodeById({ld}).widgets.map(w => w.name)")
    ui.js(f"(() => {{ const w = window.app.graph.getNodeById({q}).widgets.find(w => w.name === 'custom_layers');"
          f" w.value = 'attn\\\\.qkv'; w.callback(w.value); return true; }})()")
    _set_choice(ui, q, "custom_format", "FP8 (one scale per tensor)")
    ui.wait(f"window.app.graph.getNodeById({q}).__hqPanel.dataset.state === 'preview' && "
            f"window.app.graph.getNodeById({q}).__hqPanel.innerText.includes('→ FP8')", 30)
    text = ui.panel_text(q)
    assert "Preview for hybridquant_example_sd3_tiny.safetensors" in text and "→ NF4" in text, text
    ui.js(f"window.app.graph.getNodeById({q}).__hqPanel.querySelector('details').open = true; true")
    text = ui.panel_text(q)
    assert "matches custom_layers" in text and "the main format" in text and "joint_blocks.0.context_block.attn.qkv" in text, text
    ui.shot("6-choices-preview")
    # a workflow saved with the old option values loads with the new texts
    wf = json.loads((REPO / "example_workflows" / "quantize_and_save.json").read_text())
    node = next(n for n in wf["nodes"] if n["type"] == "HybridQuantQuantizeModel")
    node["widgets_values"][0], node["widgets_values"][3] = "bnb_nf4", "fp8 tensorwise"
    ui.js("window.app.loadGraphData(%s).then(() => true)" % json.dumps(wf))
    vals = ui.wait("""(() => { const n = window.app.graph._nodes.find(n => n.comfyClass === 'HybridQuantQuantizeModel');
        const v = ['format', 'custom_format'].map(k => n.widgets.find(w => w.name === k).value);
        return v[0].startsWith('NF4') && v; })()""", 20)
    assert vals[1].startswith("FP8 (one scale per tensor)"), vals


def test_panel(ui, comfy_server):
    """7: the panel shows live progress in layers with an ETA, then a readable summary: no raw JSON,
    no run counters, no absolute paths."""
    ui.clear()
    _, q = _quantize(ui, custom_layers=r"attn\.qkv", save=True, filename_prefix=f"hq_ui/{ui.renderer}")
    ui.js("""(() => { const p = window.app.graph.getNodeById(%d).__hqPanel; window.__hqSeen = [];
        new MutationObserver(() => window.__hqSeen.push(p.innerText)).observe(p, {childList: true, subtree: true});
        return true; })()""" % q)
    assert ui.queue() == {"ok": True}
    ui.wait_idle()
    ui.wait(f"window.app.graph.getNodeById({q}).__hqPanel.dataset.state === 'done'")
    seen = ui.js("window.__hqSeen")
    assert any("quantizing layer" in s and " of 21" in s and "ETA" in s for s in seen), seen[:5]
    text = ui.panel_text(q)
    assert text.startswith("Quantized 21 of 24 layers") and "NF4" in text and "FP8" in text, text
    assert f"saved as hq_ui/{ui.renderer}_00001.safetensors" in text
    assert "{" not in text and "#" not in text and str(comfy_server.base) not in text, text
    assert ui.panel_visible(q)
    ui.shot("7-panel-summary")


def test_budget_preview(ui):
    """Issue 14: a size budget on Quantize Model previews what it chooses (layers per format, bytes,
    expected error) in the panel, before running; a bad budget is an error naming target_size."""
    ui.clear()
    _, q = _quantize(ui, target_size="5.5bpw")
    ui.wait(f"window.app.graph.getNodeById({q}).__hqPanel.dataset.state === 'preview'", 120)
    text = ui.panel_text(q)
    assert "Budget plan: file" in text and "bits/weight" in text and "expected error" in text, text
    assert ui.js(f"!!window.app.graph.getNodeById({q}).__hqPanel.querySelector('[data-hq-budget]')")
    assert ui.panel_visible(q)
    ui.shot("budget-preview")
    ui.js("""(() => { const w = window.app.graph.getNodeById(%d).widgets.find(w => w.name === 'target_size');
        w.value = 'lots'; w.callback && w.callback(w.value); return true; })()""" % q)
    ui.wait(f"window.app.graph.getNodeById({q}).__hqPanel.dataset.state === 'invalid'")
    assert "target_size:" in ui.panel_text(q), ui.panel_text(q)


def test_search(ui, comfy_server):
    """8: searching a format name finds the pack's nodes; every display name ends in (HybridQuant)."""
    ui.clear()
    found = ui.js("""(() => { const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
        const svc = pinia._s.get('nodeDef').nodeSearchService;
        return Object.fromEntries(['fp8', 'nf4', 'int8', 'mxfp8'].map(q => [q, svc.searchNode(q).map(d => d.name)])); })()""")
    for q, names in found.items():
        assert "HybridQuantQuantizeModel" in names and "HybridQuantLoadDiffusionModel" in names, (q, names)
    # the searchable name starts with the registry's words (FormatSpec.name_word via /hybridquant/formats)
    words = comfy_server.get("/hybridquant/formats")[1]["name_words"]
    shown = ui.js("""document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia
        ._s.get('nodeDef').nodeDefsByName['HybridQuantQuantizeModel'].display_name""")
    assert words and shown == " ".join(words) + " · Quantize Model (HybridQuant)", (shown, words)
    ids = [ui.add(t, (40 + 300 * (i % 3), 60 + 200 * (i // 3))) for i, t in enumerate(
        ("HybridQuantQuantizeModel", "HybridQuantInfo", "HybridQuantLoadDiffusionModel", "HybridQuantLoadCheckpoint",
         "HybridQuantLoadCLIP", "HybridQuantCollectCalibration"))]
    titles = ui.js("[%s].map(i => window.app.graph.getNodeById(i).title)" % ",".join(map(str, ids)))
    assert all(t.endswith(" (HybridQuant)") for t in titles), titles
    ui.shot("8-titles")


def _run_workflow(ui, comfy_server, name):
    wf = json.loads((REPO / "example_workflows" / name).read_text())
    ui.js("window.app.loadGraphData(%s).then(() => true)" % json.dumps(wf))
    before = set(comfy_server.get("/history")[1] or {})
    assert ui.queue() == {"ok": True}
    ui.wait_idle()
    hist = comfy_server.get("/history")[1]
    new = [hist[k] for k in hist if k not in before]
    assert len(new) == 1 and new[0]["status"]["status_str"] == "success", json.dumps(new)[:3000]
    return new[0]


def test_example_workflows(ui, comfy_server, synthetic_models):
    """11: each bundled example workflow loads into the page, is queued like the Run button, completes."""
    clip = comfy_server.models("text_encoders") / "clip_l.safetensors"
    if not clip.exists():
        os.symlink(comfy_server.models("text_encoders") / synthetic_models["clip"], clip)
    entry = _run_workflow(ui, comfy_server, "quantize_and_save.json")
    assert (comfy_server.models("diffusion_models") / "hybridquant" / "example_nf4_fp8_00001.safetensors").is_file()
    text = next(o["text"][0] for o in entry["outputs"].values() if "text" in o)
    assert "NF4" in text and "FP8" in text
    ui.shot("11-quantize-and-save")
    entry = _run_workflow(ui, comfy_server, "load_mixed_and_sample.json")
    assert any("latents" in o for o in entry["outputs"].values()), entry["outputs"].keys()
    info = next(o for o in entry["outputs"].values() if "hybridquant_info" in o)["hybridquant_info"][0]
    assert info["formats"]["bnb_nf4"] and info["formats"]["float8_e4m3fn"]
    ui.shot("11-load-mixed-and-sample")
    entry = _run_workflow(ui, comfy_server, "quantize_to_budget.json")
    assert (comfy_server.models("diffusion_models") / "hybridquant" / "example_budget_00001.safetensors").is_file()
    text = next(o["text"][0] for o in entry["outputs"].values() if "text" in o)
    assert "Quantized" in text, text
