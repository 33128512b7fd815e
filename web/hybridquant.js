// HybridQuant frontend extension (served by ComfyUI from WEB_DIRECTORY = "./web").
//
// - On our loader nodes: a canvas-drawn widget with a compact summary of the chosen file (formats by
//   layer count, size, whether this machine gets a fast matmul path) and a small per-layer format map.
//   Data: GET /hybridquant/file_info (reads only the safetensors header, model folders only).
// - On "Quantize Model": live progress (layer, ETA) from the "hybridquant.progress" websocket
//   messages, and the final summary from "hybridquant.done".
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const LOADERS = {
  HybridQuantLoadDiffusionModel: { widget: "unet_name", folder: "diffusion_models" },
  HybridQuantLoadCheckpoint: { widget: "ckpt_name", folder: "checkpoints" },
  HybridQuantLoadCLIP: { widget: "clip_name", folder: "text_encoders" },
};
const QUANTIZE = "HybridQuantQuantizeModel";

// One colour per format family, stable across files so maps are comparable.
const COLORS = {
  bnb_nf4: "#4f8fdc", bnb_fp4: "#2f5f9c",
  float8_e4m3fn: "#e0913a", float8_e5m2: "#c9742a", float8_e4m3fn_rowwise: "#f0b25a",
  float8_e4m3fn_blockwise: "#f5c97d", int8_tensorwise: "#9c5fc9", int8_blockwise: "#c08ae6",
  mxfp8: "#3fae6a", hybrid_mxfp8: "#7fd49a", nvfp4: "#d8505a",
  bf16: "#777777", fp16: "#8c8c8c", fp32: "#a5a5a5",
};
const colorOf = (fmt) => COLORS[fmt] || "#bbbbbb";

function human(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} ${u[i]}` : `${n.toFixed(2)} ${u[i]}`;
}

function fmtSeconds(s) {
  if (s == null) return "…";
  if (s < 60) return `${s.toFixed(0)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function fastPathLine(fp) {
  if (!fp || !fp.available) return "fast path: unknown" + (fp && fp.reason ? ` (${fp.reason})` : "");
  const fast = Object.entries(fp.formats || {}).filter(([, v]) => v && v.fast).map(([k, v]) => `${k}: ${v.path}`);
  const dev = fp.device ? ` on ${fp.device}` : "";
  return fast.length ? `fast path${dev}: ${fast.join(", ")}` : `no fast path${dev} (dequantize per layer)`;
}

function summaryLines(s) {
  if (s.error) return [`⚠ ${s.error}`];
  const fmts = Object.entries(s.formats).map(([f, n]) => `${f} ×${n}`).join(", ");
  return [
    `${human(s.size_bytes)} · ${s.layer_count} layers (${s.quantized_layers} quantized)`,
    fmts || "no 2-D weights",
    fastPathLine(s.fast_path),
  ];
}

const LINE_H = 16;
const LEGEND_H = 14;

// Word-wrap text lines to the panel width (a long summary line must not be squeezed by fillText).
let measureCtx = null;
function wrapLines(lines, width) {
  measureCtx = measureCtx || document.createElement("canvas").getContext("2d");
  measureCtx.font = "12px sans-serif";
  const max = Math.max(40, width - 20);
  const out = [];
  for (const line of lines) {
    const words = String(line).split(" ");
    let cur = "";
    for (const w of words) {
      const next = cur ? `${cur} ${w}` : w;
      if (cur && measureCtx.measureText(next).width > max) {
        out.push(cur);
        cur = w;
      } else {
        cur = next;
      }
    }
    out.push(cur);
  }
  return out;
}

// Grid of the per-layer map for a panel width: one cell per layer, rows of at most ~3 px cells.
function mapGeometry(n, width) {
  const w = width - 20;
  const cols = Math.max(1, Math.min(n, Math.floor(w / 3)));
  const rows = Math.ceil(n / cols);
  const ch = rows <= 2 ? 10 : Math.max(2, Math.floor(30 / rows));
  return { cols, rows, cw: w / cols, ch, h: rows * ch + LEGEND_H + 6 };
}

// Canvas-drawn widget: text lines + optional per-layer map + optional progress bar.
function makePanel(node, name) {
  const w = {
    name,
    type: "hybridquant_panel",
    value: "",
    serialize: false,
    options: { serialize: false },
    draw(ctx, node, width, y) {
      const st = node.__hq || {};
      const lines = wrapLines(st.lines || [], width);
      const x = 10;
      ctx.save();
      ctx.fillStyle = "#1d1f24";
      ctx.fillRect(x - 4, y, width - 2 * (x - 4), this.computeSize(width)[1] - 4);
      ctx.font = "12px sans-serif";
      ctx.fillStyle = "#dcdcdc";
      ctx.textBaseline = "top";
      let yy = y + 4;
      for (const ln of lines) {
        ctx.fillText(ln, x, yy, width - 2 * x);
        yy += LINE_H;
      }
      if (st.progress != null) {
        ctx.fillStyle = "#333";
        ctx.fillRect(x, yy + 2, width - 2 * x, 8);
        ctx.fillStyle = "#4f8fdc";
        ctx.fillRect(x, yy + 2, (width - 2 * x) * Math.max(0, Math.min(1, st.progress)), 8);
        yy += 14;
      }
      if (st.map && st.map.length) {
        drawMap(ctx, st, x, yy + 2, mapGeometry(st.map.length, width));
      }
      ctx.restore();
    },
    computeSize(width) {
      const st = node.__hq || {};
      let h = 8 + LINE_H * Math.max(1, wrapLines(st.lines || [], width).length);
      if (st.progress != null) h += 14;
      if (st.map && st.map.length) h += mapGeometry(st.map.length, width).h;
      return [width, h];
    },
  };
  node.addCustomWidget(w);
  return w;
}

// One cell per layer, in natural layer order, wrapped into rows; legend under it.
function drawMap(ctx, st, x, y, geo) {
  const n = st.map.length;
  const { cols, rows, cw, ch } = geo;
  const w = cols * cw;
  for (let i = 0; i < n; i++) {
    ctx.fillStyle = colorOf(st.legend[st.map[i]]);
    ctx.fillRect(x + (i % cols) * cw, y + Math.floor(i / cols) * ch, Math.max(1, cw - 0.5), ch - 0.5);
  }
  let lx = x;
  const ly = y + rows * ch + 3;
  ctx.font = "10px sans-serif";
  for (const f of st.legend) {
    ctx.fillStyle = colorOf(f);
    ctx.fillRect(lx, ly + 1, 8, 8);
    ctx.fillStyle = "#bbb";
    ctx.fillText(f, lx + 10, ly);
    lx += 14 + ctx.measureText(f).width;
    if (lx > x + w - 40) break;
  }
}

function refresh(node) {
  node.setSize([node.size[0], node.computeSize()[1]]);
  node.setDirtyCanvas(true, true);
}

async function loadSummary(node, folder, name) {
  if (!name) return;
  const seq = (node.__hqSeq = (node.__hqSeq || 0) + 1);
  node.__hq = { lines: [`reading ${name} …`] };
  refresh(node);
  let s;
  try {
    const r = await api.fetchApi(`/hybridquant/file_info?folder=${encodeURIComponent(folder)}&name=${encodeURIComponent(name)}`);
    s = await r.json();
  } catch (e) {
    s = { error: `cannot read summary: ${e}` };
  }
  if (seq !== node.__hqSeq) return; // a newer selection won
  node.__hq = { lines: summaryLines(s), map: s.format_map || [], legend: s.format_legend || [], summary: s };
  node.hqSummary = s;
  refresh(node);
}

function setupLoader(node, spec) {
  makePanel(node, "hybridquant_summary");
  const combo = node.widgets && node.widgets.find((w) => w.name === spec.widget);
  if (!combo) return;
  const orig = combo.callback;
  combo.callback = function (v, ...rest) {
    const r = orig ? orig.call(this, v, ...rest) : undefined;
    loadSummary(node, spec.folder, combo.value);
    return r;
  };
  // Initial value (new node or loaded workflow): after the graph has set widget values.
  setTimeout(() => loadSummary(node, spec.folder, combo.value), 0);
}

function setupQuantize(node) {
  node.__hq = { lines: ["idle: queue the workflow to quantize"] };
  makePanel(node, "hybridquant_progress");
}

function nodeById(id) {
  const g = app.graph;
  return g && (g.getNodeById(Number(id)) || g.getNodeById(id));
}

app.registerExtension({
  name: "HybridQuant.FileSummary",
  async nodeCreated(node) {
    const cls = node.comfyClass || node.type;
    if (LOADERS[cls]) setupLoader(node, LOADERS[cls]);
    else if (cls === QUANTIZE) setupQuantize(node);
  },
  async setup() {
    api.addEventListener("hybridquant.progress", ({ detail: d }) => {
      const node = nodeById(d.node);
      if (!node) return;
      const frac = d.bytes_total ? d.bytes_done / d.bytes_total : 0;
      node.__hq = {
        lines: [
          `quantizing ${d.index}/${d.count} · ${(100 * frac).toFixed(0)}% · ETA ${fmtSeconds(d.eta_s)}`,
          d.layer ? `${d.layer}` : "",
        ],
        progress: frac,
      };
      refresh(node);
    });
    api.addEventListener("hybridquant.done", ({ detail: d }) => {
      const node = nodeById(d.node);
      if (!node) return;
      const lines = d.cancelled ? ["cancelled: nothing was saved"] : (d.summary || "").split("\n").slice(0, 6);
      node.__hq = { lines, summary: d };
      refresh(node);
    });
  },
});
