"""Regenerate ``example_workflows/*.json`` with the real frontend (the JSON is what its graph
serializes, so it loads in any frontend of this generation). Needs the ComfyUI tree and chromium:

    PYTHONPATH=$PWD/.pyroot .venv/bin/python -m tests.e2e.make_workflows

(run from the repo root). ``test_e2e_ui.py`` loads each file into the page and queues it.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from .harness import REPO, ComfyServer
from .ui import UI

OUT = REPO / "example_workflows"
EXAMPLE = "hybridquant_example_sd3_tiny.safetensors"
MIXED_PREFIX = "hybridquant/example_nf4_fp8"
MIXED = MIXED_PREFIX + "_00001.safetensors"
CLIP = "clip_l.safetensors"


def note(ui, text, pos):
    ui.js("""(() => { const n = window.LiteGraph.createNode('Note'); n.pos = %s; n.size = [420, 150];
        n.widgets[0].value = %s; window.app.graph.add(n); return true; })()""" % (json.dumps(pos), json.dumps(text)))


def quantize_and_save(ui):
    ui.clear()
    src = ui.add("UNETLoader", (40, 60), {"unet_name": EXAMPLE})
    q = ui.add("HybridQuantQuantizeModel", (420, 60), {"custom_layers": r"attn\.(qkv|proj)$", "save": True,
                                                      "filename_prefix": MIXED_PREFIX})
    ui.js("""(() => { const q = window.app.graph.getNodeById(%d);
        const f = q.widgets.find(w => w.name === 'format'); f.value = f.options.values.find(v => v.startsWith('NF4'));
        const c = q.widgets.find(w => w.name === 'custom_format');
        c.value = c.options.values.find(v => v.startsWith('FP8 (one scale per tensor)')); return true; })()""" % q)
    ui.connect(src, 0, q, "model")
    note(ui, "Quantize a model and save it.\n\nThe pack's bundled example (a tiny SD3 model with random weights) is "
             "quantized to NF4, with FP8 for the attention projections (custom_layers), and saved to "
             f"models/diffusion_models/{MIXED}. Put your own model in the loader; the panel previews which "
             "layer becomes what before you run.", (40, 420))
    return ui.js("JSON.stringify(window.app.graph.serialize())")


BUDGET_PREFIX = "hybridquant/example_budget"


def quantize_to_budget(ui):
    ui.clear()
    src = ui.add("UNETLoader", (40, 60), {"unet_name": EXAMPLE})
    q = ui.add("HybridQuantQuantizeModel", (420, 60), {"target_size": "5.5bpw", "save": True,
                                                      "filename_prefix": BUDGET_PREFIX})
    ui.connect(src, 0, q, "model")
    note(ui, "Quantize a model to a size budget.\n\ntarget_size picks each layer's format (bf16, INT8, INT6, "
             "INT5, NF4, NVFP4 ...) so the model's error is lowest within the budget: here 5.5 bits per weight "
             "(or a file size such as '6.5GB' / '900MB'). The panel shows the plan (layers per format, bytes, "
             f"expected error) before you run; the result is saved as models/diffusion_models/{BUDGET_PREFIX}"
             "_00001.safetensors.", (40, 420))
    return ui.js("JSON.stringify(window.app.graph.serialize())")


def load_mixed_and_sample(ui):
    ui.clear()
    m = ui.add("HybridQuantLoadDiffusionModel", (40, 60), {"unet_name": MIXED})
    c = ui.add("CLIPLoader", (40, 330), {"clip_name": CLIP, "type": "sd3"})
    pos = ui.add("CLIPTextEncode", (400, 300), {"text": "a red cube on a wooden table"})
    neg = ui.add("CLIPTextEncode", (400, 480), {"text": ""})
    lat = ui.add("EmptySD3LatentImage", (400, 660), {"width": 128, "height": 128, "batch_size": 1})
    ks = ui.add("KSampler", (820, 60), {"seed": 42, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
                                        "scheduler": "simple", "denoise": 1.0})
    save = ui.add("SaveLatent", (1180, 60), {"filename_prefix": "hybridquant/example_sample"})
    ui.add("HybridQuantInfo", (1180, 260), {"file": f"diffusion_models/{MIXED}"})
    ui.connect(m, 0, ks, "model")
    ui.connect(c, 0, pos, "clip")
    ui.connect(c, 0, neg, "clip")
    ui.connect(pos, 0, ks, "positive")
    ui.connect(neg, 0, ks, "negative")
    ui.connect(lat, 0, ks, "latent_image")
    ui.connect(ks, 0, save, "samples")
    note(ui, "Load a mixed NF4 + FP8 file and sample.\n\nRun 'quantize_and_save' first: it writes "
             f"{MIXED}. Needs an SD3/Flux CLIP-L text encoder as models/text_encoders/{CLIP}. The example "
             "model has random weights, so the latent is noise: swap in your own quantized model and add "
             "VAE Decode + Save Image with its VAE for pictures. Quantization Info lists every layer.",
         (40, 560))
    return ui.js("JSON.stringify(window.app.graph.serialize())")


def main() -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_import import comfyui_root

    base = Path(tempfile.mkdtemp(prefix="hq-wf-"))
    server = ComfyServer(comfyui_root(), base)
    server.prepare()
    # the files the workflows name must exist for the combos to accept them
    (server.models("diffusion_models") / "hybridquant").mkdir(parents=True)
    shutil.copy(REPO / "examples" / EXAMPLE, server.models("diffusion_models") / MIXED)
    (server.models("text_encoders") / CLIP).write_bytes(b"")
    server.start()
    ui = None
    try:
        ui = UI(server, "classic")
        OUT.mkdir(exist_ok=True)
        for fn in (quantize_and_save, load_mixed_and_sample, quantize_to_budget):
            data = json.loads(fn(ui))
            # ui.clear() opens a new blank workflow, whose graph id is random and whose extra records the
            # renderer it was made in: the files keep the nil id and the extra they always had (made on a
            # cleared graph), so a regeneration is byte-identical
            data["id"] = "00000000-0000-0000-0000-000000000000"
            data.get("extra", {}).pop("workflowRendererVersion", None)
            (OUT / f"{fn.__name__}.json").write_text(json.dumps(data, indent=2) + "\n")
            print("wrote", OUT / f"{fn.__name__}.json")
    finally:
        if ui is not None:
            ui.close()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
