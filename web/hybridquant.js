// HybridQuant frontend extension (served by ComfyUI from WEB_DIRECTORY = "./web").
//
// One panel per node of the pack, built as a DOM widget (addDOMWidget): the classic LiteGraph canvas
// overlays it on the node and the Vue node renderer (setting Comfy.VueNodes.Enabled) mounts the same
// element, so both renderers show the same live content (a canvas-drawn widget is redrawn by the Vue
// renderer only on resize, which froze the old panel at "reading ...").
// - Loaders and Quantization Info: the chosen file's summary (size, formats with the registry's
//   colours and labels, whether this ComfyUI's stock loaders read it, this machine's matmul path), a
//   per-layer map and a per-layer table (names, formats, shapes, sizes: what a regex needs).
//   Data: GET /hybridquant/file_info (header only, model folders only). Info also shows its run output.
// - Quantize Model: a preview of the plan (POST /hybridquant/plan on the upstream loader's file:
//   which layer becomes what, and why the rest is kept), live progress in layers with an ETA, the
//   summary, and errors: validation errors attributed to their input and run errors, never a stale
//   result after a failure.
// - Search: the formats' search words (GET /hybridquant/formats, from the registry) are added to the
//   node definitions; frontends that search only names also get them in the searchable name.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const FILE_NODES = {
  HybridQuantLoadDiffusionModel: { widget: "unet_name", folder: "diffusion_models" },
  HybridQuantLoadCheckpoint: { widget: "ckpt_name", folder: "checkpoints" },
  HybridQuantLoadCLIP: { widget: "clip_name", folder: "text_encoders" },
  HybridQuantInfo: { widget: "file", folder: null },
};
const QUANTIZE = "HybridQuantQuantizeModel";
// Upstream nodes whose MODEL is a file's weights: the preview plans that file.
const MODEL_SOURCES = {
  UNETLoader: { widget: "unet_name", folder: "diffusion_models" },
  HybridQuantLoadDiffusionModel: { widget: "unet_name", folder: "diffusion_models" },
  CheckpointLoaderSimple: { widget: "ckpt_name", folder: "checkpoints" },
  HybridQuantLoadCheckpoint: { widget: "ckpt_name", folder: "checkpoints" },
};
const PLAN_WIDGETS = ["format", "preset", "custom_layers", "custom_format", "target_size", "svd_rank", "rotate"];
const OURS = new Set([...Object.keys(FILE_NODES), QUANTIZE, "HybridQuantCollectCalibration"]);

let FORMATS = { byName: {}, legacy: {}, aliases: {}, nameWords: [] };
const formatsReady = api
  .fetchApi("/hybridquant/formats")
  .then((r) => r.json())
  .then((d) => {
    FORMATS = {
      byName: Object.fromEntries(d.formats.map((f) => [f.name, f])),
      legacy: d.choices.legacy,
      aliases: d.search_aliases,
      nameWords: d.name_words || [],
    };
  })
  .catch(() => {});
const colorOf = (fmt) => (FORMATS.byName[fmt] && FORMATS.byName[fmt].color) || "#bbbbbb";
const labelOf = (fmt, s) => (s && s.labels && s.labels[fmt]) || (FORMATS.byName[fmt] && FORMATS.byName[fmt].label) || fmt;

function human(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} ${u[i]}` : `${n.toFixed(2)} ${u[i]}`;
}
const fmtSeconds = (s) => (s == null ? "…" : s < 60 ? `${s.toFixed(0)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`);

// -- DOM helpers (text only through textContent: file and layer names are user data) -------------
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") Object.assign(e.style, v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
const STYLE = `
.hq-panel{font:12px/1.35 sans-serif;color:#dcdcdc;background:#1d1f24;border-radius:6px;padding:6px 8px;
  box-sizing:border-box;width:100%;overflow:auto;max-height:340px;pointer-events:auto}
.hq-panel .hq-line{margin:1px 0;white-space:normal;word-break:break-word}
.hq-panel .hq-error{color:#ff7b7b;font-weight:600}
.hq-panel .hq-warn{color:#ffc46b}
.hq-panel .hq-muted{color:#9a9a9a}
.hq-panel .hq-chip{display:inline-block;width:9px;height:9px;border-radius:2px;margin:0 3px 0 6px;vertical-align:-1px}
.hq-panel .hq-map{display:flex;flex-wrap:wrap;gap:1px;margin:4px 0}
.hq-panel .hq-map span{width:4px;height:8px}
.hq-panel .hq-bar{height:7px;background:#333;border-radius:3px;margin:4px 0}
.hq-panel .hq-bar div{height:7px;background:#4f8fdc;border-radius:3px}
.hq-panel table{border-collapse:collapse;font-size:11px;width:100%}
.hq-panel td,.hq-panel th{padding:1px 6px 1px 0;text-align:left;white-space:nowrap}
.hq-panel th{color:#9a9a9a;font-weight:normal}
.hq-panel summary{cursor:pointer;color:#9ec3f0}`;
function addStyle() {
  if (document.getElementById("hq-style")) return;
  document.head.append(el("style", { id: "hq-style" }, STYLE));
}

// -- panel ----------------------------------------------------------------------------------------
function makePanel(node) {
  addStyle();
  const root = el("div", { class: "hq-panel", "data-hq-panel": "1" });
  const widget = node.addDOMWidget("hybridquant_panel", "hybridquant_panel", root, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => Math.min(340, Math.max(40, root.scrollHeight + 4)),
    getMaxHeight: () => 340,
  });
  widget.serialize = false;
  node.__hqPanel = root;
  node.__hq = { state: "idle" };
  return root;
}

function render(node, state) {
  node.__hq = state;
  const root = node.__hqPanel;
  if (!root) return;
  root.dataset.state = state.state;
  root.replaceChildren(...(state.parts || []).filter(Boolean));
  requestAnimationFrame(() => {
    const h = node.computeSize ? node.computeSize()[1] : node.size[1];
    if (node.size && h > node.size[1]) node.setSize([node.size[0], h]);
    node.setDirtyCanvas && node.setDirtyCanvas(true, true);
  });
}
const line = (text, cls = "") => el("div", { class: `hq-line ${cls}` }, text);

// A run's message (queued, progress, result, error) owns the panel from then on: a preview or file
// summary still in flight (its request started before the run) must not replace it when it answers.
// A fast failed run reached the page before the preview planned at node creation came back, and the
// panel went from the run's error back to "Preview for ...". ``busy``: whether a run still owns it.
function claimPanel(node, busy) {
  clearTimeout(node.__hqTimer);
  node.__hqSeq = (node.__hqSeq || 0) + 1;
  node.__hqBusy = busy;
}

function formatsLine(s) {
  const d = el("div", { class: "hq-line" });
  for (const [f, n] of Object.entries(s.formats || {})) {
    d.append(el("span", { class: "hq-chip", style: { background: colorOf(f) } }), `${labelOf(f, s)} ×${n}`);
  }
  if (!Object.keys(s.formats || {}).length) d.append("no weight matrices");
  return d;
}

function fastLine(s) {
  const fp = s.fast_path;
  if (!s.quantized_formats || !s.quantized_formats.length) return line("not quantized: runs as in stock ComfyUI", "hq-muted");
  if (!fp || !fp.available) return line(`matmul path: unknown${fp && fp.reason ? ` (${fp.reason})` : ""}`, "hq-muted");
  const parts = Object.entries(fp.formats).map(([f, v]) => `${labelOf(f, s)}: ${v.path}`);
  return line(`on ${fp.device}: ${parts.join("; ")}`);
}

function layerMap(s) {
  const m = el("div", { class: "hq-map", title: "one cell per layer, in layer-name order" });
  (s.format_map || []).forEach((i, k) => {
    const f = s.format_legend[i];
    m.append(el("span", { style: { background: colorOf(f) }, title: `${s.layers[k].name}: ${labelOf(f, s)}` }));
  });
  return m;
}

function layerTable(rows, head, open) {
  const t = el("table", { class: "hq-layers" }, el("tr", {}, ...head.map((h) => el("th", {}, h))));
  for (const r of rows) t.append(el("tr", {}, ...r.map((c) => el("td", {}, c))));
  const d = el("details", {}, el("summary", {}, `${rows.length} layers`), t);
  if (open) d.open = true;
  return d;
}

function fileParts(s, openTable) {
  const shape = (sh) => (sh ? sh.join(" × ") : "?");
  return [
    line(`${s.name || s.file} · ${human(s.size_bytes)} · ${s.layer_count} layers (${s.quantized_layers} quantized)`),
    formatsLine(s),
    s.quantized_layers ? line(s.loading.text, s.loading.stock === false ? "hq-warn" : "hq-muted") : null,
    fastLine(s),
    layerMap(s),
    layerTable(s.layers.map((d) => [d.name, labelOf(d.format, s), shape(d.shape), human(d.bytes)]),
      ["layer", "format", "shape", "size"], openTable),
  ];
}

// -- file nodes -----------------------------------------------------------------------------------
async function loadFile(node, spec, value) {
  if (!value) return render(node, { state: "idle", parts: [line("no file chosen", "hq-muted")] });
  let folder = spec.folder;
  let name = value;
  if (!folder) [folder, name] = [value.split("/")[0], value.split("/").slice(1).join("/")];
  const seq = (node.__hqSeq = (node.__hqSeq || 0) + 1);
  render(node, { state: "loading", parts: [line(`reading ${name} …`, "hq-muted")] });
  let s;
  try {
    const r = await api.fetchApi(`/hybridquant/file_info?folder=${encodeURIComponent(folder)}&name=${encodeURIComponent(name)}`);
    s = await r.json();
  } catch (e) {
    s = { error: `cannot read the summary (${e})` };
  }
  await formatsReady;
  if (seq !== node.__hqSeq) return; // a newer selection won
  node.hqSummary = s;
  if (s.error) return render(node, { state: "error", parts: [line(`⚠ ${s.error}`, "hq-error")] });
  render(node, { state: "ok", parts: fileParts(s, node.comfyClass === "HybridQuantInfo") });
}

function setupFileNode(node, spec) {
  makePanel(node);
  const combo = node.widgets && node.widgets.find((w) => w.name === spec.widget);
  if (!combo) return;
  const orig = combo.callback;
  combo.callback = function (v, ...rest) {
    const r = orig ? orig.call(this, v, ...rest) : undefined;
    loadFile(node, spec, combo.value);
    return r;
  };
  node.__hqRefresh = () => loadFile(node, spec, combo.value);
  setTimeout(node.__hqRefresh, 0); // after a loaded workflow has set the widget values
}

// -- Quantize Model -------------------------------------------------------------------------------
function upstreamFile(node) {
  const slot = node.inputs && node.inputs.findIndex((i) => i.name === "model");
  const link = slot >= 0 && node.inputs[slot].link != null && node.graph && node.graph.links[node.inputs[slot].link];
  const src = link && node.graph.getNodeById(link.origin_id);
  const spec = src && MODEL_SOURCES[src.comfyClass || src.type];
  const w = spec && src.widgets && src.widgets.find((x) => x.name === spec.widget);
  return w && w.value ? { folder: spec.folder, name: w.value, node: src } : null;
}

function widgetValue(node, name) {
  const w = node.widgets && node.widgets.find((x) => x.name === name);
  return w ? w.value : undefined;
}

function fixLegacy(node) {
  for (const name of ["format", "custom_format"]) {
    const w = node.widgets && node.widgets.find((x) => x.name === name);
    if (w && FORMATS.legacy[w.value]) w.value = FORMATS.legacy[w.value];
  }
}

async function preview(node) {
  if (node.__hqBusy) return; // a run owns the panel
  const src = upstreamFile(node);
  if (!src) {
    return render(node, { state: "idle", parts: [line("connect a model loader to preview which layer becomes what; "
      + "queue the workflow to quantize", "hq-muted")] });
  }
  const seq = (node.__hqSeq = (node.__hqSeq || 0) + 1);
  const settings = Object.fromEntries(PLAN_WIDGETS.map((n) => [n, widgetValue(node, n)]));
  if (settings.target_size) {
    render(node, { state: "planning", parts: [line(`computing the budget plan for ${src.name} (reads the weights) …`, "hq-muted")] });
  }
  let p;
  try {
    const r = await api.fetchApi("/hybridquant/plan", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ folder: src.folder, name: src.name, settings }),
    });
    p = await r.json();
  } catch (e) {
    p = { error: `preview unavailable (${e})` };
  }
  if (seq !== node.__hqSeq || node.__hqBusy) return;
  if (p.error) {
    const where = p.input ? `${p.input}: ` : "";
    return render(node, { state: "invalid", input: p.input,
      parts: [line(`⚠ ${p.error.startsWith(where) ? p.error : where + p.error}`, "hq-error")] });
  }
  const counts = Object.entries(p.counts).map(([k, n]) => `${n} → ${k}`).join(", ");
  render(node, { state: "preview", plan: p, parts: [
    line(`Preview for ${src.name}: ${counts}`),
    p.budget ? budgetParts(p.budget) : null,
    ...p.warnings.map((w) => line(`⚠ ${w}`, "hq-warn")),
    layerTable(p.layers.map((d) => [d.name, d.shape.join(" × "), d.format ? d.label : "kept", d.reason]),
      ["layer", "shape", "becomes", "why"], false),
    line("queue the workflow to quantize", "hq-muted"),
  ] });
}

// What a size budget (target_size) chooses: per format layers, bytes and expected error (relative).
function budgetParts(b) {
  const d = el("div", { class: "hq-line", "data-hq-budget": "1" });
  const of = b.budget_bytes ? ` of ${human(b.budget_bytes)} (${(100 * b.file_bytes / b.budget_bytes).toFixed(1)}%)` : "";
  d.append(line(`Budget plan: file ${human(b.file_bytes)}${of}, ${b.bits_per_weight.toFixed(2)} bits/weight, `
    + `expected error ${b.expected_error.toExponential(2)}`));
  d.append(layerTable(b.formats.map((f) => [f.label, String(f.layers), human(f.bytes), f.error.toExponential(2)]),
    ["format", "layers", "bytes", "expected error"], true));
  return d;
}

function setupQuantize(node) {
  makePanel(node);
  const schedule = () => {
    clearTimeout(node.__hqTimer);
    node.__hqTimer = setTimeout(() => preview(node), 150);
  };
  node.__hqRefresh = schedule;
  for (const w of node.widgets || []) {
    if (!PLAN_WIDGETS.includes(w.name)) continue;
    const orig = w.callback;
    w.callback = function (...a) {
      const r = orig ? orig.apply(this, a) : undefined;
      schedule();
      return r;
    };
  }
  const origConn = node.onConnectionsChange;
  node.onConnectionsChange = function (...a) {
    const r = origConn ? origConn.apply(this, a) : undefined;
    schedule();
    return r;
  };
  setTimeout(() => { fixLegacy(node); schedule(); }, 0);
}

// -- run messages ---------------------------------------------------------------------------------
function nodeById(id) {
  const g = app.graph;
  return g && (g.getNodeById(Number(id)) || g.getNodeById(id));
}
const ourNodes = () => ((app.graph && app.graph._nodes) || []).filter((n) => OURS.has(n.comfyClass) && n.__hqPanel);

function showValidationErrors(nodeErrors) {
  for (const n of ourNodes()) {
    const ne = nodeErrors && nodeErrors[String(n.id)];
    if (!ne) continue;
    claimPanel(n, false);
    const parts = ne.errors.map((e) => {
      const input = e.extra_info && e.extra_info.input_name;
      let msg = e.details || e.message;
      // ComfyUI writes "<input> - <message>" for a node's own check
      if (input && msg.startsWith(`${input} - `)) msg = msg.slice(input.length + 3);
      return line(`⚠ ${input && !msg.startsWith(input) ? input + ": " : ""}${msg}`, "hq-error");
    });
    render(n, { state: "invalid", inputs: ne.errors.map((e) => e.extra_info && e.extra_info.input_name), parts });
  }
}

function onExecuted(node, output) {
  if (node.comfyClass === "HybridQuantInfo" && output && output.hybridquant_info) {
    claimPanel(node, false);
    const s = output.hybridquant_info[0];
    node.hqSummary = s;
    return render(node, { state: "done", parts: fileParts(s, true) });
  }
  if (node.comfyClass === QUANTIZE && output && output.text) {
    claimPanel(node, false);
    const lines = String(output.text[0]).split("\n");
    render(node, { state: "done", text: output.text[0], parts: lines.map((l) => line(l, l.startsWith("⚠") ? "hq-warn" : "")) });
  }
}

app.registerExtension({
  name: "HybridQuant.Panels",
  async addCustomNodeDefs(defs) {
    await formatsReady;
    for (const [id, words] of Object.entries(FORMATS.aliases || {})) {
      const def = defs[id];
      if (!def || !words) continue;
      def.search_aliases = def.search_aliases || words;
      // Frontends whose node search reads only name and display_name (1.32; its fuzzy search also
      // penalises matches far from the start) find the format words through a searchable name that
      // starts with them; the node's title on the canvas stays the short name.
      def.__hqTitle = def.display_name;
      // The words come from the registry (FormatSpec.name_word, registry.name_words: one word per
      // family, none contained in another, short because that search ranks late matches low).
      if (!FORMATS.nameWords.length) continue;
      def.display_name = `${FORMATS.nameWords.join(" ")} · ${def.display_name}`;
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!OURS.has(nodeData.name)) return;
    const title = nodeData.__hqTitle;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...a) {
      const r = created ? created.apply(this, a) : undefined;
      if (title && this.title === nodeData.display_name) this.title = title;
      return r;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const r = executed ? executed.call(this, output) : undefined;
      onExecuted(this, output);
      return r;
    };
  },
  async nodeCreated(node) {
    const cls = node.comfyClass || node.type;
    if (FILE_NODES[cls]) setupFileNode(node, FILE_NODES[cls]);
    else if (cls === QUANTIZE) setupQuantize(node);
  },
  async loadedGraphNode(node) {
    if ((node.comfyClass || node.type) === QUANTIZE) fixLegacy(node);
    if (node.__hqRefresh) setTimeout(node.__hqRefresh, 0);
  },
  async setup() {
    const queue = api.queuePrompt.bind(api);
    api.queuePrompt = async (...a) => {
      try {
        return await queue(...a);
      } catch (e) {
        showValidationErrors(e && e.response && e.response.node_errors);
        throw e;
      }
    };
    api.addEventListener("execution_start", () => {
      for (const n of ourNodes()) {
        if (n.comfyClass !== QUANTIZE) continue;
        claimPanel(n, true);
        render(n, { state: "queued", parts: [line("queued: waiting for the model …", "hq-muted")] });
      }
    });
    api.addEventListener("hybridquant.progress", ({ detail: d }) => {
      const node = nodeById(d.node);
      if (!node || !node.__hqPanel) return;
      claimPanel(node, true);
      const bar = el("div", { class: "hq-bar" }, el("div", { style: { width: `${(100 * d.fraction).toFixed(1)}%` } }));
      render(node, { state: "running", progress: d, parts: [
        line(`quantizing layer ${d.index} of ${d.count} · ${(100 * d.fraction).toFixed(0)}% · ETA ${fmtSeconds(d.eta_s)}`),
        bar, d.layer ? line(d.layer, "hq-muted") : null,
      ].filter(Boolean) });
    });
    api.addEventListener("hybridquant.done", ({ detail: d }) => {
      const node = nodeById(d.node);
      if (!node || !node.__hqPanel) return;
      claimPanel(node, false);
      if (d.cancelled) render(node, { state: "cancelled", parts: [line("cancelled: nothing was saved", "hq-warn")] });
      else render(node, { state: "done", text: d.summary, parts: d.summary.split("\n").map((l) => line(l, l.startsWith("⚠") ? "hq-warn" : "")) });
    });
    api.addEventListener("execution_error", ({ detail: d }) => {
      for (const n of ourNodes()) {
        if (String(n.id) === String(d.node_id)) {
          claimPanel(n, false);
          render(n, { state: "error", parts: [line(`⚠ ${d.exception_message}`, "hq-error")] });
        } else if (n.__hqBusy) {
          claimPanel(n, false);
          render(n, { state: "idle", parts: [line(`not run: ${d.node_type} failed first`, "hq-muted")] });
        }
      }
    });
    api.addEventListener("execution_interrupted", () => {
      for (const n of ourNodes()) {
        if (!n.__hqBusy) continue;
        claimPanel(n, false);
        render(n, { state: "cancelled", parts: [line("cancelled: nothing was saved", "hq-warn")] });
      }
    });
  },
});
