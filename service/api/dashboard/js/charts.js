// Drawing: line charts over time (uPlot, with a cap on the points kept), a scatter plot
// for 2-D samples and an image grid for image samples (plain canvas). Nothing draws
// when data arrives: views mark what changed and one animation frame draws it all.

const dirty = new Set();
let scheduled = false;

// Draw `target.draw()` in the next animation frame (once, however often it is asked).
export function schedule(target) {
  dirty.add(target);
  if (!scheduled) {
    scheduled = true;
    requestAnimationFrame(flush);
  }
}

function flush() {
  scheduled = false;
  const targets = Array.from(dirty);
  dirty.clear();
  for (const target of targets) {
    try {
      target.draw();
    } catch (error) {
      console.error(error);
    }
  }
}

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed"];

// A line chart of values over x (seconds). Keeps at most `cap` points: past that, every
// other point is dropped, so the whole run stays in view at half the resolution.
export class LineChart {
  constructor(container, { series, cap = 600, height = 160, axes } = {}) {
    this.container = container;
    this.cap = cap;
    this.data = [[], ...series.map(() => [])];
    const width = Math.max(240, container.clientWidth || 320);
    const opts = {
      width,
      height,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: false } },
      series: [
        { label: "time (s)" },
        ...series.map((s, i) => ({
          label: s.label,
          stroke: s.color || COLORS[i % COLORS.length],
          width: 1.5,
          scale: s.scale || "y",
          points: { show: false },
          spanGaps: true,
        })),
      ],
      axes: axes || [
        { size: 28, values: (u, ticks) => ticks.map((t) => `${t}s`) },
        { size: 56, values: (u, ticks) => ticks.map(compact) },
      ],
    };
    if (series.some((s) => s.scale === "y2")) {
      opts.axes = [...opts.axes, { scale: "y2", side: 1, size: 48, grid: { show: false }, values: (u, ticks) => ticks.map(compact) }];
    }
    this.plot = new window.uPlot(opts, this.data, container);
    this.resizer = new ResizeObserver(() => {
      const w = Math.max(240, this.container.clientWidth);
      if (Math.abs(w - this.plot.width) > 4) this.plot.setSize({ width: w, height });
    });
    this.resizer.observe(container);
  }

  push(x, values) {
    this.data[0].push(x);
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      this.data[i + 1].push(v === undefined || v === null || !Number.isFinite(v) ? null : v);
    }
    if (this.data[0].length > this.cap) {
      this.data = this.data.map((column) => column.filter((_, j) => j % 2 === 0));
    }
    schedule(this);
  }

  reset() {
    this.data = this.data.map(() => []);
    schedule(this);
  }

  get length() {
    return this.data[0].length;
  }

  draw() {
    this.plot.setData(this.data);
  }
}

// Axis labels: 12.5k rather than 12,500; small numbers as they are.
function compact(value) {
  if (value === null || value === undefined) return "";
  const abs = Math.abs(value);
  if (abs >= 1e6) return `${+(value / 1e6).toFixed(2)}M`;
  if (abs >= 1e4) return `${+(value / 1e3).toFixed(1)}k`;
  return `${+value.toPrecision(4)}`;
}

// How a generator's samples are drawn, from its manifest.
export function displayKind(manifest) {
  const shape = manifest.sample_shape || [];
  if (manifest.image || (shape.length === 3 && shape[1] > 1 && shape[2] > 1)) {
    return { kind: "grid", shape, valueRange: manifest.value_range || [0, 1] };
  }
  return { kind: "scatter", shape, partial: shape.length !== 1 || shape[0] !== 2 };
}

// Scatter of 2-D points (first two coordinates otherwise) in a square range that panels
// share: when one panel's points leave the range, the range grows and both redraw.
export class SharedRange {
  constructor() {
    this.range = null;
    this.panels = new Set();
  }
  include(points) {
    let [x0, x1, y0, y1] = this.range || [Infinity, -Infinity, Infinity, -Infinity];
    const before = this.range && this.range.join();
    for (const p of points) {
      if (p[0] < x0) x0 = p[0];
      if (p[0] > x1) x1 = p[0];
      if (p[1] < y0) y0 = p[1];
      if (p[1] > y1) y1 = p[1];
    }
    if (!Number.isFinite(x0)) return false;
    if (this.range && x0 >= this.range[0] && x1 <= this.range[1] && y0 >= this.range[2] && y1 <= this.range[3]) {
      return false;
    }
    const half = (Math.max(x1 - x0, y1 - y0) / 2) * 1.15 || 1;
    const cx = (x0 + x1) / 2;
    const cy = (y0 + y1) / 2;
    this.range = [cx - half, cx + half, cy - half, cy + half];
    if (before !== this.range.join()) {
      for (const panel of this.panels) panel.redrawAll();
      return true;
    }
    return false;
  }
}

function setupCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || Number(canvas.getAttribute("width")) || 400;
  const height = canvas.clientHeight || Number(canvas.getAttribute("height")) || 400;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  return { context, width, height };
}

const MAX_POINTS = 20000;

// The newest MAX_POINTS points in a ring (x, y pairs in one typed array): adding one is
// O(1) however many are kept.
export class ScatterPanel {
  constructor(canvas, shared, color) {
    this.canvas = canvas;
    this.shared = shared;
    this.color = color;
    this.ring = new Float32Array(2 * MAX_POINTS);
    shared.panels.add(this);
    this.clear();
  }

  clear() {
    this.count = 0; // points ever added
    this.drawn = 0; // points already on the canvas
    this.full = true;
    schedule(this);
  }

  add(samples) {
    const batch = [];
    for (const s of samples) {
      const x = Number(Array.isArray(s) ? s[0] : s);
      const y = Number(Array.isArray(s) ? (s[1] ?? 0) : 0);
      const at = 2 * (this.count % MAX_POINTS);
      this.ring[at] = x;
      this.ring[at + 1] = y;
      this.count += 1;
      batch.push([x, y]);
    }
    this.shared.include(batch);
    schedule(this);
  }

  redrawAll() {
    this.full = true;
    schedule(this);
  }

  frame() {
    const { context, width, height } = setupCanvas(this.canvas);
    context.fillStyle = "#fff";
    context.fillRect(0, 0, width, height);
    const r = this.shared.range;
    if (!r) return context;
    context.strokeStyle = "#e5e7eb";
    context.fillStyle = "#6b7280";
    context.font = "11px system-ui, sans-serif";
    context.lineWidth = 1;
    for (const t of niceTicks(r[0], r[1], 5)) {
      const x = this.sx(t, width);
      context.beginPath();
      context.moveTo(x, 0);
      context.lineTo(x, height);
      context.stroke();
      context.fillText(fmtTick(t), x + 2, height - 4);
    }
    for (const t of niceTicks(r[2], r[3], 5)) {
      const y = this.sy(t, height);
      context.beginPath();
      context.moveTo(0, y);
      context.lineTo(width, y);
      context.stroke();
      context.fillText(fmtTick(t), 2, y - 2);
    }
    return context;
  }

  sx(x, width) {
    const r = this.shared.range;
    return ((x - r[0]) / (r[1] - r[0])) * width;
  }

  sy(y, height) {
    const r = this.shared.range;
    return height - ((y - r[2]) / (r[3] - r[2])) * height;
  }

  draw() {
    const width = this.canvas.clientWidth || 400;
    const height = this.canvas.clientHeight || 400;
    let context;
    if (this.full) {
      context = this.frame();
      this.drawn = Math.max(0, this.count - MAX_POINTS);
      this.full = false;
    } else {
      context = this.canvas.getContext("2d");
      this.drawn = Math.max(this.drawn, this.count - MAX_POINTS);
    }
    if (!this.shared.range) return;
    context.fillStyle = this.color;
    context.globalAlpha = 0.55;
    const ring = this.ring;
    for (let i = this.drawn; i < this.count; i++) {
      const at = 2 * (i % MAX_POINTS);
      context.fillRect(this.sx(ring[at], width) - 1.25, this.sy(ring[at + 1], height) - 1.25, 2.5, 2.5);
    }
    this.drawn = this.count;
    context.globalAlpha = 1;
  }
}

function niceTicks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [];
  const step0 = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= step0) || step0;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) ticks.push(Math.round(t / step) * step);
  return ticks;
}

function fmtTick(t) {
  return Math.abs(t) < 1e-9 ? "0" : Number(t.toPrecision(3)).toString();
}

// A grid of image samples ([C, H, W] nested lists), newest filling the next slot.
export class ImageGrid {
  constructor(canvas) {
    this.canvas = canvas;
    this.pending = [];
    this.count = 0;
    this.shape = null;
  }

  configure(shape, valueRange) {
    this.shape = shape;
    this.valueRange = valueRange || [0, 1];
    const [, h, w] = shape;
    const cssWidth = this.canvas.clientWidth || 400;
    this.scale = Math.max(1, Math.floor(cssWidth / (w * 9)));
    this.gap = 2;
    this.tile = w * this.scale + this.gap;
    this.columns = Math.max(1, Math.floor((cssWidth + this.gap) / this.tile));
    this.rows = Math.max(1, Math.floor(((this.canvas.clientHeight || 400) + this.gap) / (h * this.scale + this.gap)));
    this.capacity = this.columns * this.rows;
    this.scratch = document.createElement("canvas");
    this.scratch.width = w;
    this.scratch.height = h;
    this.clear();
  }

  clear() {
    this.pending = [];
    this.count = 0;
    this.full = true;
    schedule(this);
  }

  add(samples) {
    for (const s of samples) {
      this.pending.push([this.count % this.capacity, s]);
      this.count += 1;
    }
    if (this.pending.length > this.capacity) this.pending = this.pending.slice(-this.capacity);
    schedule(this);
  }

  draw() {
    if (!this.shape) return;
    let context;
    if (this.full) {
      context = setupCanvas(this.canvas).context;
      context.fillStyle = "#fff";
      context.fillRect(0, 0, this.canvas.clientWidth || 400, this.canvas.clientHeight || 400);
      this.full = false;
    } else {
      context = this.canvas.getContext("2d");
    }
    context.imageSmoothingEnabled = false;
    const [c, h, w] = this.shape;
    const [lo, hi] = this.valueRange;
    const span = hi - lo || 1;
    const scratch = this.scratch.getContext("2d");
    const image = scratch.createImageData(w, h);
    const pixels = image.data;
    for (const [slot, sample] of this.pending) {
      for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
          const at = 4 * (y * w + x);
          for (let k = 0; k < 3; k++) {
            const channel = c >= 3 ? sample[k][y][x] : sample[0][y][x];
            pixels[at + k] = Math.max(0, Math.min(255, Math.round(((channel - lo) / span) * 255)));
          }
          pixels[at + 3] = 255;
        }
      }
      scratch.putImageData(image, 0, 0);
      const col = slot % this.columns;
      const row = Math.floor(slot / this.columns);
      context.drawImage(this.scratch, col * this.tile, row * (h * this.scale + this.gap), w * this.scale, h * this.scale);
    }
    this.pending = [];
  }
}
