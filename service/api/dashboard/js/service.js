// Service: throughput, batch sizes, queue depth, workers, Redis and jobs from
// GET /v1/summary, read every 2 s while the view is open. Rates come from the
// difference of two reads' totals over the server's clock.

import { getJSON } from "./api.js";
import { LineChart } from "./charts.js";
import { $, el, facts, fmt, fmtRate, percent, showError } from "./ui.js";

const PERIOD_MS = 2000;
let timer = null;
let charts = null;
let previous = null;
let startedAt = null;

function ensureCharts() {
  if (charts) return;
  charts = {
    pps: new LineChart($("#chart-svc-pps"), { series: [{ label: "proposals/s", color: "#059669" }] }),
    load: new LineChart($("#chart-svc-load"), {
      series: [
        { label: "active chains", color: "#2563eb" },
        { label: "queued rows", color: "#dc2626" },
      ],
    }),
  };
}

function tile(label, value, kind = "", note = "") {
  return el(
    `div.tile${kind ? "." + kind : ""}`,
    { dataset: { tile: label } },
    el("div.tile-label", {}, label),
    el("div.tile-value", {}, value),
    note ? el("div.tile-note", {}, note) : null,
  );
}

function render(summary, rate) {
  const s = summary.sampling;
  const jobs = summary.jobs || {};
  const depth = summary.queue_depth || {};
  const models = Object.entries(summary.models).map(([k, v]) => `${v} ${k}`).join(" · ");
  const modelCount = Object.values(summary.models).reduce((a, b) => a + b, 0);
  $("#service-tiles").replaceChildren(
    tile("mode", summary.mode),
    tile("ready", summary.ready && !summary.detail ? "yes" : summary.detail || "no", summary.ready && !summary.detail ? "ok" : "bad"),
    tile("Redis", summary.redis_up ? "up" : "down", summary.redis_up ? "ok" : "bad"),
    tile("workers", fmt(summary.workers), summary.workers > 0 ? "ok" : "bad"),
    tile("proposals / s", s.source === "none" ? "on the workers" : fmtRate(rate)),
    tile("acceptance", percent(s.acceptance_rate)),
    tile("active chains", fmt(s.active_chains)),
    tile("queued rows", fmt(s.queued_rows)),
    tile("queue depth", `online ${fmt(depth.online ?? 0)} · jobs ${fmt(depth.jobs ?? 0)}`),
    tile("jobs", `${fmt(jobs.running)} running · ${fmt(jobs.queued)} queued`, "", `${fmt(jobs.succeeded)} succeeded · ${fmt(jobs.failed)} failed · ${fmt(jobs.cancelled)} cancelled`),
    tile("models", fmt(modelCount), "", models + (summary.load_errors ? ` · ${summary.load_errors} skipped` : "")),
    tile("HTTP requests", fmt(summary.http.requests), "", `${fmt(summary.http.client_errors)} 4xx · ${fmt(summary.http.server_errors)} 5xx`),
  );
  const b = s.batch_rows;
  const peak = Math.max(1, ...b.buckets.map((x) => x.count));
  $("#service-batch").replaceChildren(
    facts([
      ["kernel steps", fmt(b.count)],
      ["rows per step", b.mean != null ? `mean ${fmt(b.mean)} · p50 ≤ ${fmt(b.p50)} · p95 ≤ ${fmt(b.p95)}` : "–"],
      ["source", s.source],
    ]),
    el(
      "div.hist",
      {},
      b.buckets.map((x) =>
        el(
          "div.hist-row",
          {},
          el("span.cls", {}, x.le == null ? "more" : `≤ ${fmt(x.le)}`),
          el("span.bar", {}, el("span", { style: `width:${((100 * x.count) / peak).toFixed(1)}%` })),
          el("span.num", {}, fmt(x.count)),
        ),
      ),
    ),
  );
  $("#service-workers").replaceChildren(
    summary.worker_list.length
      ? el(
          "table.table.compact",
          {},
          el("thead", {}, el("tr", {}, ["name", "host", "device", "running", "seen"].map((h) => el("th", {}, h)))),
          el(
            "tbody",
            {},
            summary.worker_list.map((w) =>
              el(
                "tr",
                {},
                el("td", {}, w.name),
                el("td", {}, w.host || "–"),
                el("td", {}, w.device || "–"),
                el("td", {}, Object.entries(w.running).map(([k, v]) => `${k} ${v}`).join(" · ")),
                el("td", {}, w.seen_s_ago != null ? `${w.seen_s_ago.toFixed(1)} s ago` : "–"),
              ),
            ),
          ),
        )
      : el("p.muted", {}, "no worker heartbeat"),
  );
  $("#service-models").replaceChildren(
    s.by_model.length
      ? el(
          "table.table.compact",
          {},
          el("thead", {}, el("tr", {}, ["model", "method", "proposals", "accepted", "chains", "queued"].map((h) => el("th", {}, h)))),
          el(
            "tbody",
            {},
            s.by_model.map((m) =>
              el(
                "tr",
                {},
                el("td", {}, m.model),
                el("td", {}, m.method),
                el("td.num", {}, fmt(m.proposals)),
                el("td.num", {}, fmt(m.accepted)),
                el("td.num", {}, fmt(m.active_chains)),
                el("td.num", {}, fmt(m.queued_rows)),
              ),
            ),
          ),
        )
      : el("p.muted", {}, s.source === "none" ? "sampling counters are on the workers' /metrics" : "no sampling yet"),
  );
}

async function tick() {
  try {
    const summary = await getJSON("v1/summary");
    showError($("#service-error"), null);
    let rate = summary.sampling.proposals_per_second;
    if (previous && summary.at > previous.at && summary.at - previous.at < 30) {
      const delta = summary.sampling.proposals_total - previous.sampling.proposals_total;
      rate = Math.max(0, delta / (summary.at - previous.at));
    }
    previous = summary;
    if (startedAt === null) startedAt = summary.at;
    const t = summary.at - startedAt;
    charts.pps.push(t, [rate]);
    charts.load.push(t, [summary.sampling.active_chains, summary.sampling.queued_rows]);
    render(summary, rate);
  } catch (error) {
    showError($("#service-error"), `Summary: ${error.message}`);
  }
}

export const serviceView = {
  init() {},
  show() {
    ensureCharts();
    tick();
    clearInterval(timer);
    timer = setInterval(tick, PERIOD_MS);
  },
  hide() {
    clearInterval(timer);
    timer = null;
  },
};
