// Models: every loaded model by kind with its manifest's key facts; upload and delete
// (admin token, sent only as the bearer header).

import { adminHeaders, hasAdminToken, request } from "./api.js";
import { $, busy, el, facts, fmt, showError, toast } from "./ui.js";

let catalog;

const KINDS = [
  ["generator", "Generators"],
  ["discriminator", "Discriminators"],
  ["proposal", "Proposals"],
  ["classifier", "Classifiers"],
  ["features", "Feature models"],
];

function shape(value) {
  return Array.isArray(value) ? value.join(" × ") : value;
}

function metricsLine(metrics, keys) {
  if (!metrics) return null;
  const parts = keys.filter((k) => metrics[k] !== undefined).map((k) => `${k.replaceAll("_", " ")} ${fmt(metrics[k])}`);
  return parts.length ? parts.join(" · ") : null;
}

function keyFacts(model) {
  const m = model.manifest || {};
  switch (model.kind) {
    case "generator":
      return [
        ["sample shape", shape(m.sample_shape)],
        ["latent dim", m.latent_dim],
        ["image", m.image ? `yes, values ${shape(m.value_range || [0, 1])}` : "no"],
        ["discriminator", m.discriminator],
        ["features (FID)", m.features],
        ["metrics", metricsLine(m.metrics, ["raw_generator_fid", "best_imh_fid"])],
      ];
    case "discriminator":
      return [
        ["generator", m.generator],
        ["input → output", `${m.input || "sample"} → ${m.output || "logit"}`],
        ["calibrations", (model.calibrations || []).join(", ")],
        ["default calibration", m.default_calibration],
        ["proposal", m.proposal && typeof m.proposal === "object" ? Object.entries(m.proposal).map(([k, v]) => `${k} ${v}`).join(", ") : m.proposal],
      ];
    case "classifier":
      return [
        ["input shape", shape(m.input_shape)],
        ["classes", Array.isArray(m.classes) ? `${m.classes.length}: ${m.classes.join(", ")}` : m.classes],
        ["uncertainty", m.uncertainty],
        ["compressed", m.sbp ? "SBP" : m.compressed ? "yes" : null],
        ["metrics", metricsLine(m.metrics, ["accuracy", "params_reduction", "flops_reduction"])],
      ];
    case "features":
      return [
        ["input shape", shape(m.input_shape)],
        ["feature dim", m.feature_dim],
      ];
    case "proposal":
      return [
        ["generator", m.generator],
        ["noise dim", m.noise_dim],
      ];
    default:
      return [];
  }
}

function card(model) {
  const del = el("button.small.danger", { type: "button", title: `DELETE /v1/models/${model.name}/${model.version}` }, "delete");
  del.addEventListener("click", () => remove(model, del));
  return el(
    "div.model",
    { dataset: { model: `${model.name}:${model.version}` } },
    el(
      "div.model-head",
      {},
      el("strong", {}, model.name),
      el("span.tag", {}, `v${model.version}`),
      model.latest ? el("span.tag.ok", {}, "latest") : null,
      el("span.tag", {}, model.source),
      model.format !== model.source ? el("span.tag", {}, model.format) : null,
      del,
    ),
    model.description ? el("p.muted", {}, model.description) : null,
    facts(keyFacts(model)),
    model.warnings && model.warnings.length ? el("p.warning", {}, model.warnings.join(" ")) : null,
  );
}

function render() {
  const body = $("#models-body");
  const groups = KINDS.map(([kind, title]) => {
    const models = catalog.ofKind(kind);
    if (!models.length) return null;
    return el("div.card", {}, el("h2", {}, `${title} `, el("span.muted", {}, `(${models.length})`)), el("div.model-list", {}, models.map(card)));
  });
  const errors = Object.entries(catalog.loadErrors || {});
  if (errors.length) {
    groups.push(
      el(
        "div.card",
        {},
        el("h2", {}, "Skipped at start"),
        el("ul", {}, errors.map(([folder, why]) => el("li", {}, el("code", {}, folder), " ", why))),
      ),
    );
  }
  body.replaceChildren(...groups.filter(Boolean));
}

// Uploads and deletes need the admin token: ask for it in the header's field.
function needToken(box, what) {
  if (hasAdminToken()) return false;
  showError(box, `${what} needs the admin token: enter it in the field at the top right (it stays in this tab only).`);
  const input = document.getElementById("admin-token");
  input.focus();
  input.classList.add("attention");
  setTimeout(() => input.classList.remove("attention"), 2500);
  return true;
}

async function remove(model, button) {
  const name = `${model.name}:${model.version}`;
  if (needToken($("#models-error"), `Deleting ${name}`)) return;
  if (!confirm(`Delete ${name}? An uploaded model's files are removed for good.`)) return;
  busy(button, true);
  try {
    const answer = await request(`v1/models/${encodeURIComponent(model.name)}/${encodeURIComponent(model.version)}`, {
      method: "DELETE",
      headers: adminHeaders(),
    });
    const body = await answer.json();
    toast(`${name}: ${body.detail}`, "info");
    showError($("#models-error"), null);
    await catalog.load();
  } catch (error) {
    showError($("#models-error"), `Delete ${name}: ${error.message}`);
  } finally {
    busy(button, false);
  }
}

async function upload(event) {
  event.preventDefault();
  const form = event.target;
  const field = (name) => form.querySelector(`[name=${name}]`);
  const button = form.querySelector("button[type=submit]");
  const data = new FormData();
  data.append("name", field("name").value.trim());
  if (field("version").value.trim()) data.append("version", field("version").value.trim());
  if (field("replace").checked) data.append("replace", "true");
  if (field("manifest").files[0]) data.append("manifest", field("manifest").files[0]);
  for (const file of field("files").files) data.append("files", file);
  showError($("#upload-error"), null);
  if (needToken($("#upload-error"), "Uploading a model")) return;
  busy(button, true);
  try {
    const response = await request("v1/models", { method: "POST", body: data, headers: adminHeaders() });
    const model = await response.json();
    $("#upload-result").textContent = `Installed ${model.name}:${model.version} (${model.kind}).${
      model.warnings && model.warnings.length ? " " + model.warnings.join(" ") : ""
    }`;
    await catalog.load();
  } catch (error) {
    showError($("#upload-error"), `Upload: ${error.message}`);
  } finally {
    busy(button, false);
  }
}

export const modelsView = {
  init(shared) {
    catalog = shared;
    catalog.onChange(render);
    $("#upload-form").addEventListener("submit", upload);
    $("#models-refresh").addEventListener("click", () =>
      catalog.load().then(
        () => showError($("#models-error"), null),
        (error) => showError($("#models-error"), error.message),
      ),
    );
  },
  show() {},
};

