// cellclass web page: predict an image, show its Grad-CAM overlay, contribute it with labels.
// Plain browser JavaScript (no build step); talks to the same server's /v1 API.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;
let overlayUrl = null;

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function setStatus(id, text, kind) {
  const el = $(id);
  el.textContent = text;
  el.className = "status" + (kind ? " " + kind : "");
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    return JSON.stringify(body.detail);
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

function chosenFile() {
  const files = $("image-input").files;
  return files && files.length ? files[0] : null;
}

async function loadModel() {
  const response = await fetch("/v1/model");
  if (!response.ok) {
    $("model-summary").textContent = "model unavailable: " + (await errorText(response));
    return;
  }
  model = await response.json();
  const m = model.model;
  $("model-summary").textContent =
    `${m.name} (${m.run}, epoch ${m.epoch}, ${m.backend}) · ${model.in_chans} channel(s) ` +
    `[${model.channels.join(", ")}] · input ${model.image_size}×${model.image_size} · ` +
    `tasks: ${model.tasks.map((t) => t.name).join(", ")}` + (model.open_predict ? " · predict open" : "");
  buildLabelInputs();
}

function buildLabelInputs() {
  const box = $("labels");
  box.textContent = "";
  for (const task of model.tasks) {
    const wrap = document.createElement("div");
    const label = document.createElement("label");
    label.textContent = `${task.name} (${task.type})`;
    wrap.appendChild(label);
    if (task.type === "multilabel") {
      const checks = document.createElement("div");
      checks.className = "checks";
      checks.dataset.task = task.name;
      for (const cls of task.classes) {
        const item = document.createElement("label");
        const box = document.createElement("input");
        box.type = "checkbox";
        box.value = cls;
        item.append(box, cls);
        checks.appendChild(item);
      }
      wrap.appendChild(checks);
    } else {
      const select = document.createElement("select");
      select.dataset.task = task.name;
      select.id = "label-" + task.name;
      label.htmlFor = select.id;
      for (const cls of task.classes) {
        const option = document.createElement("option");
        option.value = option.textContent = cls;
        select.appendChild(option);
      }
      wrap.appendChild(select);
    }
    box.appendChild(wrap);
  }
}

function renderPrediction(prediction) {
  const box = $("predictions");
  box.textContent = "";
  const title = document.createElement("p");
  title.className = "muted";
  title.textContent = prediction.filename;
  box.appendChild(title);
  for (const [task, result] of Object.entries(prediction.tasks)) {
    const section = document.createElement("div");
    section.className = "task";
    const h = document.createElement("h3");
    h.textContent = task;
    const label = document.createElement("div");
    label.className = "label";
    label.dataset.task = task;
    label.textContent = Array.isArray(result.label) ? (result.label.join(", ") || "(none)") : result.label;
    section.append(h, label);
    const chosen = new Set(Array.isArray(result.label) ? result.label : [result.label]);
    for (const [cls, p] of Object.entries(result.probabilities)) {
      const row = document.createElement("div");
      row.className = "bar" + (chosen.has(cls) ? " chosen" : "");
      const name = document.createElement("span");
      name.textContent = cls;
      const track = document.createElement("div");
      track.className = "track";
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = (100 * p).toFixed(1) + "%";
      track.appendChild(fill);
      const value = document.createElement("span");
      value.textContent = (100 * p).toFixed(1) + "%";
      row.append(name, track, value);
      section.appendChild(row);
    }
    box.appendChild(section);
    // Pre-select the predicted label in the contribution form.
    const select = document.querySelector(`select[data-task="${CSS.escape(task)}"]`);
    if (select && !Array.isArray(result.label)) select.value = result.label;
  }
}

async function predict() {
  const file = chosenFile();
  if (!file) { setStatus("predict-status", "choose an image first (TIFF, PNG or NPY)", "error"); return; }
  $("predict-button").disabled = true;
  setStatus("predict-status", "predicting…");
  try {
    const form = new FormData();
    form.append("image", file, file.name);
    const response = await fetch("/v1/predict", { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) { setStatus("predict-status", `error ${response.status}: ${await errorText(response)}`, "error"); return; }
    const body = await response.json();
    renderPrediction(body.predictions[0]);
    setStatus("predict-status", `predicted by ${body.model.name} (${body.model.backend})`, "ok");
    await showSaliency(file);
  } catch (err) {
    setStatus("predict-status", "request failed: " + err, "error");
  } finally {
    $("predict-button").disabled = false;
  }
}

async function showSaliency(file) {
  const form = new FormData();
  form.append("image", file, file.name);
  const response = await fetch("/v1/saliency", { method: "POST", body: form, headers: authHeaders() });
  if (!response.ok) { $("overlay-caption").textContent = "no saliency: " + (await errorText(response)); return; }
  const blob = await response.blob();
  if (overlayUrl) URL.revokeObjectURL(overlayUrl);
  overlayUrl = URL.createObjectURL(blob);
  const img = $("overlay");
  img.onload = () => { img.dataset.loaded = "true"; };
  img.src = overlayUrl;
  $("overlay-figure").hidden = false;
  const p = Number(response.headers.get("X-Cellclass-Probability"));
  $("overlay-caption").textContent =
    `Grad-CAM (${response.headers.get("X-Cellclass-Layer")}) for ${response.headers.get("X-Cellclass-Task")} = ` +
    `${response.headers.get("X-Cellclass-Class")} (p = ${p.toFixed(3)}): input left, overlay right`;
}

function collectLabels() {
  const labels = {};
  for (const el of document.querySelectorAll("#labels [data-task]")) {
    if (el.tagName === "SELECT") labels[el.dataset.task] = el.value;
    else labels[el.dataset.task] = [...el.querySelectorAll("input:checked")].map((c) => c.value);
  }
  return labels;
}

async function contribute() {
  const file = chosenFile();
  if (!file) { setStatus("contribute-status", "choose an image first (above)", "error"); return; }
  $("contribute-button").disabled = true;
  try {
    const form = new FormData();
    form.append("image", file, file.name);
    form.append("labels", JSON.stringify(collectLabels()));
    const metadata = $("metadata").value.trim();
    if (metadata) form.append("metadata", metadata);
    const response = await fetch("/v1/contributions", { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) { setStatus("contribute-status", `error ${response.status}: ${await errorText(response)}`, "error"); return; }
    const body = await response.json();
    setStatus("contribute-status",
      `${body.duplicate ? "already contributed" : "thank you"}: contribution ${body.id} is ${body.status}`, "ok");
  } catch (err) {
    setStatus("contribute-status", "request failed: " + err, "error");
  } finally {
    $("contribute-button").disabled = false;
  }
}

$("predict-button").addEventListener("click", predict);
$("contribute-button").addEventListener("click", contribute);
loadModel();
