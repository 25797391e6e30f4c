// Jobs: this tab's jobs (its own X-IMH-Job-Token) by state, live progress from each
// running job's events, cancel/forget, download; generate and filter submissions.

import { ApiError, events, getJSON, jobToken, request, saveBlob } from "./api.js";
import { $, $$, ago, busy, el, fillSelect, fmt, percent, showError } from "./ui.js";

let catalog;
let jobs = new Map(); // id -> job
let filter = "";
let poller = null;
const followers = new Map(); // id -> AbortController of its events stream
const MAX_FOLLOWED = 8;
const TERMINAL = ["succeeded", "failed", "cancelled"];

const headers = () => ({ "X-IMH-Job-Token": jobToken() });

function refreshForms() {
  const generators = catalog.ofKind("generator").map((m) => [m.latest ? m.name : `${m.name}:${m.version}`, `${m.name}:${m.version}`]);
  fillSelect($("#generate-form [name=generator]"), generators);
  fillSelect(
    $("#generate-form [name=method]"),
    catalog.methods.map((m) => [m.name]),
    $("#generate-form [name=method]").value || "imh",
  );
  const discriminators = catalog
    .ofKind("discriminator")
    .filter((d) => (d.manifest.input || "sample") === "sample")
    .map((d) => [d.latest ? d.name : `${d.name}:${d.version}`, `${d.name}:${d.version}`]);
  fillSelect($("#filter-form [name=discriminator]"), discriminators);
}

function numberField(form, name) {
  const raw = form.querySelector(`[name=${name}]`).value.trim();
  return raw === "" ? undefined : Number(raw);
}

async function submitGenerate(event) {
  event.preventDefault();
  const form = event.target;
  const spec = {
    type: "generate",
    generator: form.querySelector("[name=generator]").value,
    method: form.querySelector("[name=method]").value,
    n: numberField(form, "n"),
  };
  for (const name of ["steps", "seed"]) {
    const value = numberField(form, name);
    if (value !== undefined) spec[name] = value;
  }
  await submit(form, () => request("v1/jobs", { method: "POST", json: spec, headers: headers() }));
}

async function submitFilter(event) {
  event.preventDefault();
  const form = event.target;
  const spec = {
    type: "filter",
    discriminator: form.querySelector("[name=discriminator]").value,
    method: form.querySelector("[name=method]").value,
  };
  for (const name of ["chain_length", "seed"]) {
    const value = numberField(form, name);
    if (value !== undefined) spec[name] = value;
  }
  const file = form.querySelector("[name=candidates]").files[0];
  if (!file) {
    showError($("#jobs-error"), "Choose a candidates file (.npy or .safetensors).");
    return;
  }
  const data = new FormData();
  data.append("job", JSON.stringify(spec));
  data.append("candidates", file, file.name);
  await submit(form, () => request("v1/jobs", { method: "POST", body: data, headers: headers() }));
}

async function submit(form, send) {
  const button = form.querySelector("button[type=submit]");
  busy(button, true);
  showError($("#jobs-error"), null);
  try {
    const job = await (await send()).json();
    jobs.set(job.id, job);
    render();
    follow(job);
  } catch (error) {
    showError($("#jobs-error"), `Submit: ${error.message}`);
  } finally {
    busy(button, false);
  }
}

async function refresh() {
  try {
    const answer = await getJSON("v1/jobs?limit=200", { headers: headers() });
    const seen = new Map(answer.jobs.map((job) => [job.id, job]));
    jobs = seen;
    render();
    for (const job of answer.jobs) if (!TERMINAL.includes(job.state)) follow(job);
    if ($("#jobs-error").textContent.startsWith("Jobs:")) showError($("#jobs-error"), null);
  } catch (error) {
    showError($("#jobs-error"), `Jobs: ${error.message}`);
  }
}

// Follow a job's events (SSE with the token header) until it ends.
async function follow(job) {
  if (followers.has(job.id) || TERMINAL.includes(job.state) || followers.size >= MAX_FOLLOWED) return;
  const controller = new AbortController();
  followers.set(job.id, controller);
  try {
    const response = await request(`v1/jobs/${job.id}/events`, {
      headers: headers(),
      signal: controller.signal,
      accept: "text/event-stream",
    });
    for await (const event of events(response)) {
      const current = jobs.get(job.id);
      if (!current) break;
      if (event.event === "progress") {
        current.progress = event.data.progress;
        current.counts = { ...current.counts, ...event.data };
      } else if (event.event === "state") {
        current.state = event.data.state;
        if (event.data.error) current.error = event.data.error;
      }
      renderRow(current);
      if (event.event === "state" && TERMINAL.includes(event.data.state)) break;
    }
  } catch (error) {
    if (error.name !== "AbortError" && !(error instanceof ApiError && error.status === 404)) {
      showError($("#jobs-error"), `Job ${job.id}: ${error.message}`);
    }
  } finally {
    followers.delete(job.id);
  }
  if (!controller.signal.aborted) {
    // The events end with the job: read it whole once more (counts, error, result).
    try {
      const latest = await getJSON(`v1/jobs/${job.id}`, { headers: headers() });
      jobs.set(latest.id, latest);
      renderRow(latest);
      render();
    } catch (_) {
      /* deleted meanwhile */
    }
  }
}

async function cancel(job, button) {
  busy(button, true);
  try {
    followers.get(job.id)?.abort();
    await request(`v1/jobs/${job.id}`, { method: "DELETE", headers: headers() });
    jobs.delete(job.id);
    render();
  } catch (error) {
    showError($("#jobs-error"), `Job ${job.id}: ${error.message}`);
  } finally {
    busy(button, false);
  }
}

async function download(job, button) {
  busy(button, true);
  try {
    const response = await request(`v1/jobs/${job.id}/result`, { headers: headers() });
    const what = job.type === "filter" ? "indices" : "samples";
    saveBlob(await response.blob(), `${job.id}-${what}.npy`);
  } catch (error) {
    showError($("#jobs-error"), `Job ${job.id}: ${error.message}`);
  } finally {
    busy(button, false);
  }
}

function row(job) {
  const tr = el("tr", { dataset: { job: job.id } });
  fillRow(tr, job);
  return tr;
}

function fillRow(tr, job) {
  const counts = job.counts || {};
  const done = !TERMINAL.includes(job.state) ? null : job.state;
  const actions = el("td.actions");
  if (job.state === "succeeded") {
    const get = el("button.small", { type: "button" }, "download");
    get.addEventListener("click", () => download(job, get));
    actions.append(get);
  }
  const drop = el("button.small.danger", { type: "button" }, done ? "forget" : "cancel");
  drop.addEventListener("click", () => cancel(job, drop));
  actions.append(drop);
  const progress = Math.round(100 * (job.progress || 0));
  const what = job.type === "generate" ? job.spec?.generator : job.spec?.discriminator;
  tr.replaceChildren(
    el("td", {}, el("code", {}, job.id.slice(0, 12)), el("div.muted", {}, `${what || ""} · ${job.spec?.method || ""}`)),
    el("td", {}, job.type),
    el("td", {}, el(`span.state.${job.state}`, {}, job.state), job.error ? el("div.error-text", {}, job.error) : null),
    el("td", {}, el("div.bar", { title: `${progress} %` }, el("span", { style: `width:${progress}%` })), el("span.muted", {}, `${progress} %`)),
    el("td", {}, `${fmt(counts.items_done)} / ${fmt(counts.items)}`),
    el("td", {}, percent(counts.acceptance_rate)),
    el("td.muted", {}, ago(job.created_at)),
    actions,
  );
}

function renderRow(job) {
  const tr = $(`#jobs-table tr[data-job="${job.id}"]`);
  if (tr) fillRow(tr, job);
  else render();
}

function render() {
  const all = Array.from(jobs.values()).sort((a, b) => b.created_at - a.created_at);
  for (const button of $$("#job-states button")) {
    const state = button.dataset.state;
    const count = state ? all.filter((j) => j.state === state).length : all.length;
    button.querySelector("span").textContent = count ? `(${count})` : "";
    button.classList.toggle("on", state === filter);
  }
  const shown = filter ? all.filter((j) => j.state === filter) : all;
  $("#jobs-table tbody").replaceChildren(...shown.map(row));
  $("#jobs-empty").hidden = shown.length > 0;
  $("#jobs-empty").textContent = all.length ? `No ${filter} jobs.` : "No jobs yet in this tab.";
}

export const jobsView = {
  init(shared) {
    catalog = shared;
    catalog.onChange(refreshForms);
    $("#generate-form").addEventListener("submit", submitGenerate);
    $("#filter-form").addEventListener("submit", submitFilter);
    for (const button of $$("#job-states button")) {
      button.addEventListener("click", () => {
        filter = button.dataset.state;
        render();
      });
    }
  },
  show() {
    refresh();
    clearInterval(poller);
    poller = setInterval(refresh, 3000);
  },
  hide() {
    clearInterval(poller);
    poller = null;
  },
};
