// The dashboard: views switched by the URL's hash, a catalog of models and methods the
// views share, a connection monitor that says when the server is away (and reloads the
// catalog when it is back), and a last resort that shows any uncaught error.

import { getJSON, onReachability, setAdminToken } from "./api.js";
import { classifiersView } from "./classifiers.js";
import { jobsView } from "./jobs.js";
import { modelsView } from "./models.js";
import { sampleView } from "./sample.js";
import { serviceView } from "./service.js";
import { $, $$, toast } from "./ui.js";

const VIEWS = {
  models: modelsView,
  sample: sampleView,
  jobs: jobsView,
  classifiers: classifiersView,
  service: serviceView,
};

// Models and methods, loaded once and again after a reconnect or an upload.
export const catalog = {
  models: [],
  methods: [],
  loadErrors: {},
  listeners: new Set(),
  loaded: false,
  async load() {
    const [models, methods] = await Promise.all([getJSON("v1/models"), getJSON("v1/methods")]);
    this.models = models.models;
    this.loadErrors = models.load_errors || {};
    this.methods = methods.methods;
    this.loaded = true;
    for (const listener of this.listeners) listener(this);
  },
  onChange(listener) {
    this.listeners.add(listener);
    if (this.loaded) listener(this);
  },
  ofKind(kind) {
    return this.models.filter((m) => m.kind === kind);
  },
  latest(kind) {
    return this.ofKind(kind).filter((m) => m.latest);
  },
  find(name) {
    const [base, version] = name.split(":");
    const matches = this.models.filter((m) => m.name === base && (!version || m.version === version));
    return matches.find((m) => m.latest) || matches[matches.length - 1];
  },
};

let current = null;

function route() {
  const name = (location.hash || "#sample").slice(1);
  const view = VIEWS[name] ? name : "sample";
  if (current === view) return;
  if (current) {
    VIEWS[current].hide?.();
    $(`#view-${current}`).hidden = true;
  }
  current = view;
  $(`#view-${view}`).hidden = false;
  for (const link of $$("#nav a")) link.classList.toggle("on", link.dataset.view === view);
  VIEWS[view].show?.();
}

// Connection: /readyz now and then; quicker while the server is away.
const conn = {
  state: "unknown",
  timer: null,
  async check() {
    clearTimeout(this.timer);
    let next = 5000;
    try {
      const response = await fetch("readyz", { cache: "no-store" });
      const body = await response.json().catch(() => ({}));
      if (response.ok) this.set("ready", `ready · ${body.mode} · ${body.workers} worker(s)`);
      else this.set("unready", body.detail || `not ready (${response.status})`);
      if (!response.ok) next = 2000;
    } catch (error) {
      this.set("down", "server unreachable");
      next = 1000;
    }
    this.timer = setTimeout(() => this.check(), next);
  },
  set(state, text) {
    const pill = $("#conn");
    const was = this.state;
    this.state = state;
    pill.textContent = state === "ready" ? "● " + text : state === "down" ? "○ " + text : "◐ " + text;
    pill.className = `pill ${state}`;
    pill.title = text;
    const banner = $("#banner");
    if (state === "down") {
      banner.hidden = false;
      banner.textContent = "The server does not answer. The page keeps what it shows and reconnects by itself.";
    } else if (state === "unready") {
      banner.hidden = false;
      banner.textContent = `The server is not ready: ${text}`;
    } else {
      banner.hidden = true;
    }
    if (state === "ready" && was !== "ready" && was !== "unknown") {
      toast("Connected to the server again.", "info");
      catalog.load().catch((error) => toast(error.message, "error"));
    }
  },
};

onReachability((ok) => {
  if (!ok && conn.state !== "down") conn.check();
});

function adminForm() {
  const form = $("#admin-form");
  const input = $("#admin-token");
  const state = $("#admin-state");
  const forget = $("#admin-forget");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = input.value.trim();
    input.value = ""; // the token stays in a variable of this tab only
    setAdminToken(token);
    input.hidden = Boolean(token);
    form.querySelector("button[type=submit]").hidden = Boolean(token);
    state.textContent = token ? "admin token set (this tab only)" : "";
    forget.hidden = !token;
  });
  forget.addEventListener("click", () => {
    setAdminToken(null);
    input.hidden = false;
    form.querySelector("button[type=submit]").hidden = false;
    state.textContent = "";
    forget.hidden = true;
  });
}

window.addEventListener("error", (event) => {
  if (String(event.message).startsWith("ResizeObserver loop")) return; // harmless, by spec
  toast(`The page hit an error: ${event.message}`, "error", 10000);
});
window.addEventListener("unhandledrejection", (event) => {
  const reason = event.reason;
  toast(reason && reason.message ? reason.message : String(reason), "error", 10000);
});

async function start() {
  adminForm();
  for (const view of Object.values(VIEWS)) view.init(catalog);
  window.addEventListener("hashchange", route);
  route();
  conn.check();
  try {
    await catalog.load();
  } catch (error) {
    toast(`Could not load the models: ${error.message}`, "error", 10000);
    // Reconnecting loads them; until then retry now and then.
    const retry = setInterval(() => {
      catalog.load().then(() => clearInterval(retry), () => {});
    }, 3000);
  }
  document.body.dataset.ready = "1";
}

start();
