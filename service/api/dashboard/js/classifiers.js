// Classifiers: pick one, draw an input on a canvas scaled to its input shape (or upload
// .npy / .json), see class probabilities with SBN's entropy and mutual information, and
// for SBP-compressed networks the compression report.

import { getJSON, request } from "./api.js";
import { $, el, facts, fillSelect, fmt, percent, showError } from "./ui.js";

let catalog;
let info = null; // GET /v1/classifiers/{name}
let pixels = new Float32Array(64); // H*W drawn intensities in [0, 1]
let shape = [1, 8, 8];
let drawing = false;

const field = (name) => $(`#classify-form [name=${name}]`);

function refresh() {
  const classifiers = catalog.ofKind("classifier").map((m) => [m.latest ? m.name : `${m.name}:${m.version}`, `${m.name}:${m.version}`]);
  fillSelect(field("classifier"), classifiers, field("classifier").value || preferred(classifiers));
  select();
}

function preferred(options) {
  const sbn = options.find(([value]) => value.includes("sbn"));
  return sbn ? sbn[0] : options[0]?.[0];
}

async function select() {
  const name = field("classifier").value;
  if (!name) return;
  showError($("#classify-error"), null);
  $("#classify-result").replaceChildren();
  try {
    info = await getJSON(`v1/classifiers/${encodeURIComponent(name)}`);
  } catch (error) {
    showError($("#classify-error"), `Classifier ${name}: ${error.message}`);
    return;
  }
  if (info.samples) field("samples").placeholder = `${info.samples.default} (max ${info.samples.max})`;
  else field("samples").placeholder = "not SBN";
  field("samples").disabled = info.uncertainty !== "sbn";
  const newShape = info.input_shape;
  if (newShape.join() !== shape.join()) {
    shape = newShape;
    pixels = new Float32Array(shape[shape.length - 2] * shape[shape.length - 1]);
  }
  drawGrid();
  renderInfo();
}

function renderInfo() {
  const box = $("#classifier-info");
  const m = info.metrics || {};
  const parts = [
    el("h3", {}, `${info.name}:${info.version}`),
    info.description ? el("p.muted", {}, info.description) : null,
    facts([
      ["uncertainty", info.uncertainty],
      ["classes", info.classes.join(", ")],
      ["input shape", info.input_shape.join(" × ")],
      ["accuracy", m.accuracy !== undefined ? percent(m.accuracy) : null],
      ["OOD AUROC (entropy)", m.ood_auroc_entropy !== undefined ? fmt(m.ood_auroc_entropy) : null],
      ["OOD AUROC (mutual information)", m.ood_auroc_mutual_information !== undefined ? fmt(m.ood_auroc_mutual_information) : null],
      ["SBN statistics", info.sbn ? `batch ${info.sbn.batch_size}, momentum ${info.sbn.momentum}, ${info.sbn.epochs} epochs` : null],
      ["samples (K)", info.samples ? `default ${info.samples.default}, max ${info.samples.max}` : null],
      ["compressed version", info.compressed],
      ["original", info.original],
    ]),
  ];
  if (info.sbp) parts.push(sbpReport(info.sbp));
  box.replaceChildren(...parts.filter(Boolean));
}

function sbpReport(sbp) {
  const layers = sbp.layers || [];
  const rows = layers.map((layer, i) =>
    el("tr", {}, el("td", {}, layer), el("td.num", {}, fmt(sbp.units_before?.[i])), el("td.num", {}, fmt(sbp.units_after?.[i]))),
  );
  const speed = Object.entries(sbp.speedup || {}).map(([batch, x]) => `batch ${batch}: ${fmt(x)}×`).join(" · ");
  return el(
    "div.sbp",
    {},
    el("h3", {}, "SBP compression report"),
    el("table.table.compact", {}, el("thead", {}, el("tr", {}, el("th", {}, "layer"), el("th", {}, "units before"), el("th", {}, "after"))), el("tbody", {}, rows)),
    facts([
      ["parameters", `${fmt(sbp.params_before)} → ${fmt(sbp.params_after)} (${fmt(sbp.params_reduction)}× fewer)`],
      ["FLOPs", `${fmt(sbp.flops_before)} → ${fmt(sbp.flops_after)} (${fmt(sbp.flops_reduction)}× fewer)`],
      ["accuracy", `${percent(sbp.accuracy)} (original ${percent(sbp.original_accuracy)})`],
      ["speed-up", speed],
      ["SNR threshold", sbp.snr_threshold],
    ]),
  );
}

// Drawing ---------------------------------------------------------------------------------

function canvasGeometry() {
  const canvas = $("#draw-canvas");
  const h = shape[shape.length - 2];
  const w = shape[shape.length - 1];
  const cell = Math.max(4, Math.floor(192 / Math.max(h, w)));
  return { canvas, h, w, cell };
}

function drawGrid() {
  const { canvas, h, w, cell } = canvasGeometry();
  canvas.width = w * cell;
  canvas.height = h * cell;
  canvas.style.width = `${w * cell}px`;
  canvas.style.height = `${h * cell}px`;
  const context = canvas.getContext("2d");
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const v = Math.round(255 * (1 - pixels[y * w + x]));
      context.fillStyle = `rgb(${v},${v},${v})`;
      context.fillRect(x * cell, y * cell, cell, cell);
    }
  }
  if (cell >= 8) {
    context.strokeStyle = "rgba(0,0,0,0.08)";
    for (let i = 0; i <= w; i++) context.strokeRect(i * cell, 0, 0, h * cell);
    for (let i = 0; i <= h; i++) context.strokeRect(0, i * cell, w * cell, 0);
  }
}

function paint(event) {
  const { canvas, h, w, cell } = canvasGeometry();
  const box = canvas.getBoundingClientRect();
  const fx = ((event.clientX - box.left) / box.width) * w * cell;
  const fy = ((event.clientY - box.top) / box.height) * h * cell;
  const cx = fx / cell - 0.5;
  const cy = fy / cell - 0.5;
  const radius = Math.max(0.6, w / 12);
  for (let y = Math.floor(cy - 2 * radius); y <= Math.ceil(cy + 2 * radius); y++) {
    for (let x = Math.floor(cx - 2 * radius); x <= Math.ceil(cx + 2 * radius); x++) {
      if (x < 0 || y < 0 || x >= w || y >= h) continue;
      const d2 = ((x - cx) ** 2 + (y - cy) ** 2) / (radius * radius);
      const add = Math.exp(-d2);
      pixels[y * w + x] = Math.min(1, pixels[y * w + x] + add * 0.6);
    }
  }
  drawGrid();
}

function drawnInputs() {
  const range = catalog.find(field("classifier").value)?.manifest?.value_range || [0, 1];
  const [lo, hi] = range;
  const c = shape.length === 3 ? shape[0] : 1;
  const h = shape[shape.length - 2];
  const w = shape[shape.length - 1];
  const plane = [];
  for (let y = 0; y < h; y++) {
    const line = [];
    for (let x = 0; x < w; x++) line.push(lo + (hi - lo) * pixels[y * w + x]);
    plane.push(line);
  }
  const one = shape.length === 3 ? Array.from({ length: c }, () => plane) : plane;
  return [one];
}

// Predicting --------------------------------------------------------------------------------

function options() {
  const out = {};
  const samples = field("samples").value.trim();
  const seed = field("seed").value.trim();
  if (samples && !field("samples").disabled) out.samples = Number(samples);
  if (seed) out.seed = Number(seed);
  return out;
}

async function predictJSON(body) {
  const name = field("classifier").value;
  return (await request(`v1/classifiers/${encodeURIComponent(name)}/predict`, { method: "POST", json: body })).json();
}

async function predictDrawn() {
  showError($("#classify-error"), null);
  try {
    show(await predictJSON({ inputs: drawnInputs(), ...options() }));
  } catch (error) {
    showError($("#classify-error"), `Predict: ${error.message}`);
  }
}

async function predictFile(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  showError($("#classify-error"), null);
  const name = field("classifier").value;
  try {
    let answer;
    if (file.name.toLowerCase().endsWith(".json")) {
      let parsed;
      try {
        parsed = JSON.parse(await file.text());
      } catch (error) {
        throw new Error(`${file.name} is not JSON: ${error.message}`);
      }
      const body = Array.isArray(parsed) ? { inputs: parsed } : parsed;
      answer = await predictJSON({ ...options(), ...body });
    } else {
      const query = new URLSearchParams(Object.entries(options()).map(([k, v]) => [k, String(v)]));
      const response = await request(`v1/classifiers/${encodeURIComponent(name)}/predict?${query}`, {
        method: "POST",
        body: await file.arrayBuffer(),
        headers: { "Content-Type": "application/x-npy" },
      });
      answer = await response.json();
    }
    show(answer, file.name);
  } catch (error) {
    showError($("#classify-error"), `Predict ${file.name}: ${error.message}`);
  }
}

function show(answer, source) {
  const predictions = answer.predictions || [];
  const shown = predictions.slice(0, 8);
  const classes = info ? info.classes : [];
  const blocks = shown.map((p, i) => {
    const bars = p.probs.map((prob, k) =>
      el(
        "div.prob",
        { class: `prob${k === p.label || classes[k] === p.label ? " top" : ""}` },
        el("span.cls", {}, String(classes[k] ?? k)),
        el("span.bar", {}, el("span", { style: `width:${(100 * prob).toFixed(1)}%` })),
        el("span.num", {}, percent(prob)),
      ),
    );
    return el(
      "div.prediction",
      {},
      el("h4", {}, predictions.length > 1 ? `input ${i}: ` : "", "label ", el("strong", {}, String(p.label))),
      el("div.probs", {}, bars),
      facts([
        ["entropy", fmt(p.entropy)],
        ["mutual information", answer.uncertainty === "sbn" ? fmt(p.mutual_information) : "– (not an SBN model)"],
      ]),
    );
  });
  $("#classify-result").replaceChildren(
    el("p.muted", {}, `${answer.model} · ${answer.uncertainty}${answer.samples ? ` · K = ${answer.samples}` : ""}${source ? ` · ${source}` : ""}${predictions.length > shown.length ? ` · first ${shown.length} of ${predictions.length} inputs` : ""}`),
    ...blocks,
  );
}

export const classifiersView = {
  init(shared) {
    catalog = shared;
    catalog.onChange(refresh);
    field("classifier").addEventListener("change", select);
    const canvas = $("#draw-canvas");
    canvas.addEventListener("pointerdown", (event) => {
      drawing = true;
      canvas.setPointerCapture(event.pointerId);
      paint(event);
    });
    canvas.addEventListener("pointermove", (event) => drawing && paint(event));
    canvas.addEventListener("pointerup", () => {
      drawing = false;
    });
    $("#draw-clear").addEventListener("click", () => {
      pixels.fill(0);
      drawGrid();
    });
    $("#draw-predict").addEventListener("click", predictDrawn);
    $("#classify-file").addEventListener("change", predictFile);
  },
  show() {},
};
