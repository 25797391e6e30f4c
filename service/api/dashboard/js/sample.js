// Sample: a form built from GET /v1/methods, a stream (POST /v1/sample/stream read with
// fetch) drawn as it arrives beside raw generator samples of the same seed, live charts
// of acceptance, throughput, FID and R-hat/ESS, a stop button and downloads.

import { ApiError, events, request, saveBlob, sendJSON } from "./api.js";
import { displayKind, ImageGrid, LineChart, ScatterPanel, SharedRange, schedule } from "./charts.js";
import { $, el, facts, fillSelect, fmt, fmtRate, percent, showError } from "./ui.js";

let catalog;
let charts = null;
let panels = null;
let run = null; // the stream running or last run: {body, seed, controller, ...}
const MAX_KEPT_VALUES = 16 * 2 ** 20; // 64 MiB of float32 kept for the .npy download
const MAX_PNG_IMAGES = 1024;
const BLOCK_VALUES = 1 << 18; // kept samples live in float32 blocks of this many values

const form = () => $("#sample-form");
const field = (name) => form().querySelector(`[name=${name}]`);

// Method parameters ----------------------------------------------------------------------

// The JSON schema of one option, reduced to what the form needs.
function describe(schema) {
  const options = schema.anyOf ? schema.anyOf.filter((s) => s.type !== "null") : [schema];
  const inner = options.length === 1 && options[0].anyOf ? options[0].anyOf : options;
  const enums = inner.flatMap((s) => s.enum || (s.const !== undefined ? [s.const] : []));
  const types = inner.map((s) => s.type).filter(Boolean);
  const bounds = { ...(options[0] || {}), ...(inner.find((s) => s.type === "number" || s.type === "integer") || {}) };
  const min = bounds.minimum ?? bounds.ge ?? bounds.exclusiveMinimum ?? bounds.gt;
  const max = bounds.maximum ?? bounds.le ?? bounds.exclusiveMaximum ?? bounds.lt;
  const numeric = types.includes("number") || types.includes("integer");
  if (numeric && enums.length) return { kind: "number-or", words: enums, integer: !types.includes("number"), min, max };
  if (numeric) return { kind: "number", integer: !types.includes("number"), min, max };
  if (enums.length) return { kind: "choice", words: enums };
  return { kind: "text" };
}

function buildParams(method) {
  const box = $("#params");
  const legend = el("legend", {}, `${method.name} parameters`);
  const inputs = [];
  for (const [name, schema] of Object.entries(method.params.properties || {})) {
    if (name === "mode") continue; // a stream is in stream mode
    const spec = describe(schema);
    const title = schema.description || "";
    let input;
    if (spec.kind === "choice") {
      input = el("select", { name: `p.${name}`, dataset: { kind: "choice" } });
      fillSelect(input, [["", "default"], ...spec.words.map((w) => [w])]);
    } else {
      const hint = spec.kind === "number-or" ? `number or ${spec.words.join("/")}` : "default";
      input = el("input", {
        name: `p.${name}`,
        type: spec.kind === "number" ? "number" : "text",
        step: spec.kind === "number" ? (spec.integer ? "1" : "any") : undefined,
        min: spec.kind === "number" ? spec.min : undefined,
        max: spec.kind === "number" ? spec.max : undefined,
        placeholder: name === "thin" ? "1" : hint,
        dataset: { kind: spec.kind, integer: spec.integer ? "1" : "" },
      });
    }
    inputs.push(el("label", { title }, name, input));
  }
  box.replaceChildren(legend, ...(inputs.length ? inputs : [el("span.muted", {}, "none")]));
  $("#method-summary").textContent = method.summary;
}

function readParams() {
  const params = {};
  for (const input of form().querySelectorAll("[name^='p.']")) {
    const name = input.name.slice(2);
    const raw = input.value.trim();
    if (raw === "") continue;
    const kind = input.dataset.kind;
    if (kind === "choice" || kind === "text") params[name] = raw;
    else if (/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(raw)) {
      params[name] = input.dataset.integer && /^[+-]?\d+$/.test(raw) ? parseInt(raw, 10) : Number(raw);
    } else params[name] = raw; // "auto", or something the server will name as wrong
  }
  return params;
}

// The form ------------------------------------------------------------------------------

function generatorOptions() {
  return catalog.ofKind("generator").map((m) => [m.latest ? m.name : `${m.name}:${m.version}`, `${m.name}:${m.version}`]);
}

function onGenerator() {
  const generator = catalog.find(field("generator").value);
  const base = generator ? generator.name : "";
  const defaultD = generator && generator.manifest.discriminator;
  const discriminators = catalog.ofKind("discriminator").filter((d) => d.manifest.generator === base);
  fillSelect(field("discriminator"), [
    ["", `default${defaultD ? ` (${defaultD})` : ""}`],
    ...discriminators.map((d) => [d.latest ? d.name : `${d.name}:${d.version}`, `${d.name}:${d.version}`]),
  ]);
  onDiscriminator();
}

function onDiscriminator() {
  const generator = catalog.find(field("generator").value);
  const chosen = field("discriminator").value || (generator && generator.manifest.discriminator);
  const d = chosen ? catalog.find(chosen) : null;
  const calibrations = d ? d.calibrations || [] : [];
  const fallback = d && d.manifest.default_calibration;
  fillSelect(field("calibration"), [["", `default${fallback ? ` (${fallback})` : ""}`], ...calibrations.map((c) => [c])]);
}

function onMethod() {
  const method = catalog.methods.find((m) => m.name === field("method").value);
  if (method) buildParams(method);
}

function refreshForm() {
  fillSelect(field("generator"), generatorOptions());
  fillSelect(
    field("method"),
    catalog.methods.map((m) => [m.name, `${m.name}`]),
    field("method").value || "imh",
  );
  onGenerator();
  onMethod();
}

function readBody() {
  const body = { generator: field("generator").value, method: field("method").value };
  if (field("discriminator").value) body.discriminator = field("discriminator").value;
  if (field("calibration").value) body.calibration = field("calibration").value;
  const number = (name) => {
    const raw = field(name).value.trim();
    return raw === "" ? undefined : Number(raw);
  };
  body.n = number("n");
  if (number("steps") !== undefined) body.steps = number("steps");
  const seed = number("seed");
  body.seed = seed !== undefined ? seed : Math.floor(Math.random() * 2 ** 31);
  const params = readParams();
  if (Object.keys(params).length) body.params = params;
  return body;
}

// Display -------------------------------------------------------------------------------

function ensureCharts() {
  if (charts) return;
  charts = {
    acc: new LineChart($("#chart-acc"), { series: [{ label: "acceptance" }] }),
    pps: new LineChart($("#chart-pps"), { series: [{ label: "proposals/s", color: "#059669" }] }),
    fid: new LineChart($("#chart-fid"), { series: [{ label: "FID", color: "#dc2626" }] }),
    rhat: new LineChart($("#chart-rhat"), {
      series: [
        { label: "R-hat", color: "#7c3aed" },
        { label: "ESS", color: "#d97706", scale: "y2" },
      ],
    }),
  };
}

function preparePanels(generator) {
  const display = displayKind(generator.manifest);
  $("#fid-note").textContent = generator.manifest.features ? `(features: ${generator.manifest.features})` : "(none: this generator names no features model)";
  const rawCanvas = $("#raw-canvas");
  const streamCanvas = $("#stream-canvas");
  if (display.kind === "grid") {
    const raw = new ImageGrid(rawCanvas);
    const stream = new ImageGrid(streamCanvas);
    raw.configure(display.shape, display.valueRange);
    stream.configure(display.shape, display.valueRange);
    panels = { display, raw, stream, capacity: stream.capacity };
  } else {
    const shared = new SharedRange();
    panels = {
      display,
      raw: new ScatterPanel(rawCanvas, shared, "#6b7280"),
      stream: new ScatterPanel(streamCanvas, shared, "#2563eb"),
      capacity: 4096,
    };
  }
  $("#sample-view-note")?.remove();
  if (display.partial) {
    $("#stream-canvas").before(el("p.muted#sample-view-note", {}, "first two coordinates of each sample"));
  }
}

// The numbers beside the plots: redrawn at most every STATS_MS (an animation frame).
const STATS_MS = 250;
let statsDrawnAt = 0;
let statsTimer = null;
function scheduleStats() {
  const wait = statsDrawnAt + STATS_MS - performance.now();
  if (wait <= 0) schedule(stats);
  else if (statsTimer === null) {
    statsTimer = setTimeout(() => {
      statsTimer = null;
      schedule(stats);
    }, wait);
  }
}

const stats = {
  draw() {
    statsDrawnAt = performance.now();
    if (!run) return;
    const m = run.metrics || {};
    const d = run.done || {};
    const seconds = ((run.finishedAt || performance.now()) - run.startedAt) / 1000;
    $("#sample-stats").replaceChildren(
      el("h3", {}, "stream"),
      facts([
        ["samples", `${fmt(run.received)} / ${fmt(run.body.n)}`],
        ["proposals", fmt(d.proposals ?? m.proposals)],
        ["acceptance", percent(d.acceptance_rate ?? m.acceptance_rate)],
        ["proposals / s", fmtRate(m.proposals_per_second)],
        ["running FID", m.fid != null ? `${fmt(m.fid)} (${fmt(m.fid_samples)} samples)` : "–"],
        ["R-hat", fmt(d.r_hat ?? m.r_hat)],
        ["ESS", fmt(d.ess ?? m.ess)],
        ["elapsed", `${seconds.toFixed(1)} s`],
        ["seed", String(run.seed)],
        ["kept for download", run.store.truncated ? `first ${fmt(run.store.count)} samples (64 MiB)` : null],
        ["method", run.body.method],
        ["generator", d.generator || run.body.generator],
        ["discriminator", d.discriminator || run.body.discriminator],
        ["calibration", d.calibration || run.body.calibration],
        ["steps", d.steps || run.body.steps],
        ["diagnostics", d.diagnostics_note],
      ]),
    );
    $("#stream-count").textContent = `${fmt(run.received)} received`;
    const warnings = Array.from(run.warnings);
    const box = $("#sample-warnings");
    box.hidden = warnings.length === 0;
    box.textContent = warnings.join(" ");
  },
};

function status(text, kind = "") {
  const node = $("#sample-status");
  node.textContent = text;
  node.className = `status ${kind}`;
}

function setRunning(on) {
  $("#sample-run").disabled = on;
  $("#sample-stop").disabled = !on;
}

// Running -------------------------------------------------------------------------------

async function start(event) {
  event.preventDefault();
  if (run && run.controller && !run.finished) run.controller.abort();
  showError($("#sample-error"), null);
  const body = readBody();
  const generator = catalog.find(body.generator);
  if (!generator) {
    showError($("#sample-error"), `No generator ${body.generator} is loaded.`);
    return;
  }
  ensureCharts();
  for (const chart of Object.values(charts)) chart.reset();
  preparePanels(generator);
  const controller = new AbortController();
  run = {
    body,
    seed: body.seed,
    generator,
    controller,
    startedAt: performance.now(),
    received: 0,
    metrics: null,
    done: null,
    warnings: new Set(),
    finished: false,
    store: { blocks: [], values: 0, count: 0, truncated: false },
  };
  const current = run;
  setRunning(true);
  $("#sample-npy").disabled = true;
  $("#sample-png").disabled = true;
  status("starting…", "running");
  schedule(stats);
  rawSamples(current);
  try {
    const response = await request("v1/sample/stream", {
      method: "POST",
      json: body,
      signal: controller.signal,
      accept: "text/event-stream",
    });
    status("streaming…", "running");
    for await (const event of events(response)) {
      if (current !== run) break;
      handle(current, event);
      if (event.event === "done" || event.event === "error") break;
    }
    if (!current.done && !current.failed && current === run) {
      throw new ApiError(0, "the stream ended before its `done` event (did the server restart?)");
    }
  } catch (error) {
    if (error.name === "AbortError") {
      status(`stopped after ${fmt(current.received)} samples`, "stopped");
    } else {
      current.failed = true;
      showError($("#sample-error"), `Stream: ${error.message}`);
      status("failed", "failed");
    }
  } finally {
    current.finished = true;
    current.finishedAt = performance.now();
    if (current === run) {
      setRunning(false);
      $("#sample-npy").disabled = false;
      $("#sample-png").disabled = false;
      schedule(stats);
    }
  }
}

function handle(current, event) {
  const t = (performance.now() - current.startedAt) / 1000;
  if (event.event === "samples") {
    const samples = event.data.samples || [];
    current.received += samples.length;
    keep(current, samples);
    panels.stream.add(samples);
    scheduleStats();
  } else if (event.event === "metrics") {
    const m = event.data;
    current.metrics = m;
    current.warnings = new Set(m.warnings || []);
    charts.acc.push(t, [m.acceptance_rate]);
    charts.pps.push(t, [m.proposals_per_second]);
    charts.fid.push(t, [m.fid]);
    charts.rhat.push(t, [m.r_hat, m.ess]);
    scheduleStats();
  } else if (event.event === "done") {
    current.done = event.data;
    current.warnings = new Set(event.data.warnings || []);
    if (event.data.r_hat != null || event.data.ess != null) charts.rhat.push(t, [event.data.r_hat, event.data.ess]);
    charts.acc.push(t, [event.data.acceptance_rate]);
    const counted = event.data.n !== undefined && event.data.n !== current.received ? ` (the server counted ${fmt(event.data.n)})` : "";
    status(`done: ${fmt(current.received)} samples in ${event.data.seconds.toFixed(2)} s${counted}`, "done");
    schedule(stats);
  } else if (event.event === "error") {
    current.failed = true;
    const code = event.data.code ? `${event.data.code}: ` : "";
    showError($("#sample-error"), `Stream: ${code}${event.data.detail || JSON.stringify(event.data)}`);
    status("failed", "failed");
  }
}

async function rawSamples(current) {
  const n = Math.min(current.body.n, panels.capacity);
  $("#raw-count").textContent = "";
  try {
    const answer = await sendJSON(
      "v1/sample",
      { generator: current.body.generator, method: "none", n, seed: current.seed },
      { signal: current.controller.signal },
    );
    if (current !== run) return;
    panels.raw.add(answer.samples);
    $("#raw-count").textContent = `${fmt(answer.samples.length)} shown`;
  } catch (error) {
    if (error.name !== "AbortError" && current === run) {
      $("#raw-count").textContent = `could not draw them: ${error.message}`;
    }
  }
}

function stop() {
  if (run && run.controller) run.controller.abort();
}

// Downloads are what the stream delivered, as the server sent them (float32 values
// printed exactly): .npy of every sample kept, .png of the image grid or the scatter.
function keep(current, samples) {
  const store = current.store;
  for (const sample of samples) {
    const values = Array.isArray(sample) ? (Array.isArray(sample[0]) ? sample.flat(Infinity) : sample) : [sample];
    if (store.values + values.length > MAX_KEPT_VALUES) {
      store.truncated = true;
      return;
    }
    let block = store.blocks[store.blocks.length - 1];
    if (!block || block.used + values.length > block.data.length) {
      block = { data: new Float32Array(Math.max(BLOCK_VALUES, values.length)), used: 0 };
      store.blocks.push(block);
    }
    block.data.set(values, block.used);
    block.used += values.length;
    store.values += values.length;
    store.count += 1;
  }
}

function keptChunks(store) {
  return store.blocks.map((block) => block.data.subarray(0, block.used));
}

function npyBytes(chunks, shape) {
  const descr = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(", ")}${shape.length === 1 ? "," : ""}), }`;
  const unpadded = 10 + descr.length + 1;
  const header = descr + " ".repeat((64 - (unpadded % 64)) % 64) + "\n";
  const head = new Uint8Array(10 + header.length);
  head.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0], 0); // \x93NUMPY v1.0
  new DataView(head.buffer).setUint16(8, header.length, true);
  for (let i = 0; i < header.length; i++) head[10 + i] = header.charCodeAt(i);
  return new Blob([head, ...chunks], { type: "application/x-npy" });
}

function gridPng(store, shape, valueRange, scale = 4) {
  const [c, h, w] = shape;
  const size = c * h * w;
  const flat = new Float32Array(Math.min(store.count, MAX_PNG_IMAGES) * size);
  let offset = 0;
  for (const chunk of keptChunks(store)) {
    const take = Math.min(chunk.length, flat.length - offset);
    flat.set(chunk.subarray(0, take), offset);
    offset += take;
  }
  const shown = Array.from({ length: flat.length / size }, (_, i) => flat.subarray(i * size, (i + 1) * size));
  const columns = Math.max(1, Math.ceil(Math.sqrt(shown.length)));
  const rows = Math.max(1, Math.ceil(shown.length / columns));
  const canvas = document.createElement("canvas");
  canvas.width = columns * (w * scale + 2);
  canvas.height = rows * (h * scale + 2);
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.imageSmoothingEnabled = false;
  const tile = document.createElement("canvas");
  tile.width = w;
  tile.height = h;
  const tileContext = tile.getContext("2d");
  const image = tileContext.createImageData(w, h);
  const [lo, hi] = valueRange;
  shown.forEach((values, index) => {
    for (let p = 0; p < h * w; p++) {
      for (let k = 0; k < 3; k++) {
        const v = values[(c >= 3 ? k : 0) * h * w + p];
        image.data[4 * p + k] = Math.max(0, Math.min(255, Math.round(((v - lo) / (hi - lo || 1)) * 255)));
      }
      image.data[4 * p + 3] = 255;
    }
    tileContext.putImageData(image, 0, 0);
    const x = (index % columns) * (w * scale + 2);
    const y = Math.floor(index / columns) * (h * scale + 2);
    context.drawImage(tile, x, y, w * scale, h * scale);
  });
  return canvas;
}

function download(format) {
  if (!run) return;
  const store = run.store;
  const name = `${run.body.generator.replace(":", "-")}-${run.body.method}-seed${run.seed}.${format}`;
  if (!store.count) {
    showError($("#sample-error"), "Nothing to download: the stream delivered no samples.");
    return;
  }
  const shape = run.generator.manifest.sample_shape || [store.values / store.count];
  if (format === "npy") {
    saveBlob(npyBytes(keptChunks(store), [store.count, ...shape]), name);
  } else if (panels.display.kind === "grid") {
    gridPng(store, shape, panels.display.valueRange).toBlob((blob) => saveBlob(blob, name), "image/png");
  } else {
    $("#stream-canvas").toBlob((blob) => saveBlob(blob, name), "image/png");
  }
}

export const sampleView = {
  init(shared) {
    catalog = shared;
    catalog.onChange(refreshForm);
    field("generator").addEventListener("change", onGenerator);
    field("discriminator").addEventListener("change", onDiscriminator);
    field("method").addEventListener("change", onMethod);
    form().addEventListener("submit", start);
    $("#sample-stop").addEventListener("click", stop);
    $("#sample-npy").addEventListener("click", () => download("npy"));
    $("#sample-png").addEventListener("click", () => download("png"));
  },
  show() {
    ensureCharts();
  },
};
