// cellclass web page: predict an image (with its Grad-CAM overlay) or several (a table and a CSV),
// contribute labelled images, label the server's ranked queue one image at a time, and, for
// curators, review contributions. Plain browser JavaScript (no build step); talks to the same
// server's /v1 API.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;
let overlayUrl = null;
let role = null;  // the key's role, from /v1/keys/me (null without a valid key)

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

function taskSection(task, result) {
  // One task's decision and its probabilities as bars (the chosen classes highlighted).
  return taskBlock(task, result, task, null, Infinity);
}

function labelText(label) {
  return Array.isArray(label) ? (label.join(", ") || "(none)") : label;
}

function probabilityBars(probabilities, chosen, limit) {
  // Bars of the `limit` most probable classes, highest first (all of them for Infinity, in the given order).
  const box = document.createElement("div");
  let entries = Object.entries(probabilities);
  if (Number.isFinite(limit)) entries = entries.sort((a, b) => b[1] - a[1]).slice(0, limit);
  for (const [cls, p] of entries) {
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
    box.appendChild(row);
  }
  return box;
}

function taskBlock(task, result, heading, note, limit) {
  // A task's decision under `heading`, an optional note, and its probability bars.
  const section = document.createElement("div");
  section.className = "task";
  const h = document.createElement("h3");
  h.textContent = heading;
  const label = document.createElement("div");
  label.className = "label";
  label.dataset.task = task;
  label.textContent = labelText(result.label);
  section.append(h, label);
  if (note) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = note;
    section.appendChild(p);
  }
  const chosen = new Set(Array.isArray(result.label) ? result.label : [result.label]);
  section.appendChild(probabilityBars(result.probabilities, chosen, limit));
  return section;
}

function renderPrediction(prediction) {
  const box = $("predictions");
  box.textContent = "";
  const title = document.createElement("p");
  title.className = "muted";
  title.textContent = prediction.filename;
  box.appendChild(title);
  for (const [task, result] of Object.entries(prediction.tasks)) {
    box.appendChild(taskSection(task, result));
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


// -- views and roles ------------------------------------------------------------------------
const ROLES = ["predict", "contribute", "curate"];
const allows = (needed) => role !== null && ROLES.indexOf(role) >= ROLES.indexOf(needed);
const loaded = { label: false, review: false };

function showView(name) {
  for (const button of document.querySelectorAll("#views button")) {
    button.classList.toggle("active", button.dataset.view === name);
  }
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== "view-" + name;
  if (name === "label" && !loaded.label) { loaded.label = true; startQueue(); }
  if (name === "review" && !loaded.review) { loaded.review = true; loadReview(true); }
}

function currentView() {
  const active = document.querySelector("#views button.active");
  return active ? active.dataset.view : "predict";
}

let checkedKey = null;

async function checkKey() {
  // Ask the server who the key is, and show the views its role may use.
  const key = $("api-key").value.trim();
  if (key === checkedKey) return;
  checkedKey = key;
  role = null;
  if (key) {
    try {
      const response = await fetch("/v1/keys/me", { headers: authHeaders() });
      if (response.ok) role = (await response.json()).role;
    } catch (_) { /* the views stay hidden */ }
  }
  if (key !== checkedKey) return;  // the key changed meanwhile: its own check decides
  $("key-hint").textContent = role ? `Key of role ${role}.` : (key ? "This key is not valid here." :
    "Predicting may need a key with role predict; labelling needs contribute; reviewing needs curate.");
  document.querySelector('#views [data-view="label"]').hidden = !allows("contribute");
  document.querySelector('#views [data-view="review"]').hidden = !allows("curate");
  loaded.label = loaded.review = false;  // another key sees another queue and other contributions
  const view = currentView();
  if ((view === "label" && !allows("contribute")) || (view === "review" && !allows("curate"))) showView("predict");
  else if (view === "label" || view === "review") showView(view);
}

let keyTimer = null;
function keyChanged() {
  clearTimeout(keyTimer);
  keyTimer = setTimeout(checkKey, 300);
}

// -- images as channels: NPY from the server, contrast set here ------------------------------
const COLOURS = { gray: [255, 255, 255], red: [255, 0, 0], green: [0, 255, 0], blue: [0, 0, 255],
                  cyan: [0, 255, 255], magenta: [255, 0, 255], yellow: [255, 255, 0] };
const PALETTE = ["green", "magenta", "cyan", "yellow", "red", "blue", "gray"];

function parseNpy(buffer) {
  // An NPY file (format 1, 2 or 3) of uint8, uint16 or float32 values: {data, shape}.
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.slice(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("the server did not send an NPY file");
  const view = new DataView(buffer);
  const start = bytes[6] === 1 ? 10 : 12;
  const length = bytes[6] === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const header = new TextDecoder("latin1").decode(bytes.slice(start, start + length));
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const types = { "|u1": Uint8Array, "<u1": Uint8Array, "<u2": Uint16Array, "<f4": Float32Array };
  if (!types[descr] || /'fortran_order':\s*True/.test(header)) throw new Error("unexpected NPY layout " + descr);
  const data = new types[descr](buffer.slice(start + length));
  while (shape.length < 3) shape.unshift(1);
  return { data, shape, dtype: descr };
}

function channelStats(image, c) {
  // A sorted sample of channel c's values (at most 65,536), for its range and percentiles.
  const [, h, w] = image.shape;
  const n = h * w;
  const step = Math.max(1, Math.floor(n / 65536));
  const sample = new Float32Array(Math.ceil(n / step));
  for (let i = 0, j = 0; i < n; i += step, j++) sample[j] = image.data[c * n + i];
  sample.sort();
  return sample;
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.round((p / 100) * (sorted.length - 1))))];
}

function renderChannels(canvas, image, channels) {
  // Each visible channel mapped linearly from [lo, hi] to [0, 1], times its colour, added up.
  const [c, h, w] = image.shape;
  const n = h * w;
  canvas.width = w;
  canvas.height = h;
  const rgb = new Float32Array(n * 3);
  for (let k = 0; k < c; k++) {
    const setting = channels[k];
    if (!setting.visible) continue;
    const colour = COLOURS[setting.colour];
    const scale = 1 / Math.max(setting.hi - setting.lo, 1e-12);
    for (let i = 0; i < n; i++) {
      const v = Math.min(1, Math.max(0, (image.data[k * n + i] - setting.lo) * scale));
      rgb[3 * i] += v * colour[0];
      rgb[3 * i + 1] += v * colour[1];
      rgb[3 * i + 2] += v * colour[2];
    }
  }
  const context = canvas.getContext("2d");
  const out = context.createImageData(w, h);
  for (let i = 0; i < n; i++) {
    out.data[4 * i] = Math.min(255, rgb[3 * i]);
    out.data[4 * i + 1] = Math.min(255, rgb[3 * i + 1]);
    out.data[4 * i + 2] = Math.min(255, rgb[3 * i + 2]);
    out.data[4 * i + 3] = 255;
  }
  context.putImageData(out, 0, 0);
}

function autoChannels(image, low, high, previous) {
  // Contrast from percentiles per channel; colours and visibility kept from `previous`.
  const c = image.shape[0];
  return Array.from({ length: c }, (_, k) => {
    const sorted = channelStats(image, k);
    let lo = percentile(sorted, low);
    let hi = percentile(sorted, high);
    if (hi <= lo) { lo = sorted[0]; hi = Math.max(sorted[sorted.length - 1], lo + 1); }
    const old = previous && previous[k];
    return { lo, hi, min: sorted[0], max: sorted[sorted.length - 1], visible: old ? old.visible : true,
             colour: old ? old.colour : (c === 1 ? "gray" : PALETTE[k % PALETTE.length]) };
  });
}

async function fetchNpy(url) {
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) throw new Error(`error ${response.status}: ${await errorText(response)}`);
  return parseNpy(await response.arrayBuffer());
}

function channelName(k, count) {
  return model && model.channels.length === count && model.channels[k] ? model.channels[k] : `channel ${k + 1}`;
}

// -- the labelling queue --------------------------------------------------------------------
const queue = { items: [], index: 0, after: 0, done: false, image: null, channels: null, choices: {},
                active: 0, busy: false, count: 0, generation: 0 };

async function fetchQueue() {
  // The next page of items to label, ranked after the last one fetched.
  const generation = queue.generation;
  const params = new URLSearchParams({ limit: "20", after: String(queue.after), unlabelled_by: $("label-mode").value });
  const response = await fetch("/v1/queue?" + params, { headers: authHeaders() });
  if (!response.ok) throw new Error(`error ${response.status}: ${await errorText(response)}`);
  const body = await response.json();
  if (generation !== queue.generation) return body;  // the queue was restarted meanwhile
  queue.items.push(...body.items);
  if (body.items.length) queue.after = body.items[body.items.length - 1].rank;
  if (body.items.length >= body.total) queue.done = true;
  $("label-progress").textContent =
    `${body.queue.ranking}: ${body.queue.size} image(s) ranked by ${body.queue.strategies.join(", ")}; ` +
    `${body.labelled} labelled` + ($("label-mode").value === "me" ? " by this key" : "");
  return body;
}

async function startQueue() {
  Object.assign(queue, { items: [], index: 0, after: 0, done: false, generation: queue.generation + 1 });
  $("label-area").hidden = true;
  setStatus("label-status", "loading the queue…");
  try {
    await fetchQueue();
    setStatus("label-status", "");
    await showItem();
  } catch (err) {
    setStatus("label-status", String(err.message || err), "error");
  }
}

async function showItem() {
  if (queue.index >= queue.items.length && !queue.done) await fetchQueue();
  const item = queue.items[queue.index];
  if (!item) {
    $("label-area").hidden = true;
    setStatus("label-status", "Nothing left to label in this queue.", "ok");
    return;
  }
  const canvas = $("label-canvas");
  queue.choices = {};
  queue.active = 0;
  try {
    const image = await fetchNpy(`/v1/queue/${item.rank}/image`);
    if (queue.items[queue.index] !== item) return;  // moved on meanwhile
    const keep = $("contrast-lock").checked && queue.channels && queue.channels.length === image.shape[0];
    queue.image = image;
    queue.channels = keep ? queue.channels : autoChannels(image, Number($("contrast-low").value),
                                                          Number($("contrast-high").value), queue.channels);
    buildChannelControls();
    renderChannels(canvas, image, queue.channels);
  } catch (err) {
    setStatus("label-status", `rank ${item.rank}: ${err.message || err}`, "error");
    return;
  }
  canvas.dataset.rank = String(item.rank);
  $("label-caption").textContent = `rank ${item.rank} · ${item.image} · ${item.strategy} score ` +
    (item.score === null ? "–" : item.score.toFixed(4)) + ` · ${queue.image.shape.slice(1).join("×")} px, ` +
    `${queue.image.dtype === "<u2" ? "16-bit" : queue.image.dtype === "|u1" ? "8-bit" : "float"}` +
    (item.labels ? ` · labelled by ${item.labels} key(s)` : "");
  const guess = $("label-guess");
  guess.textContent = "";
  for (const [task, result] of Object.entries(item.tasks)) guess.appendChild(taskSection(task, result));
  buildChoices();
  $("label-area").hidden = false;
}

function buildChannelControls() {
  const box = $("channel-controls");
  box.textContent = "";
  const count = queue.channels.length;
  queue.channels.forEach((setting, k) => {
    const row = document.createElement("div");
    row.className = "channel";
    row.dataset.channel = String(k);
    const visible = document.createElement("input");
    visible.type = "checkbox";
    visible.checked = setting.visible;
    visible.title = "show this channel";
    const name = document.createElement("span");
    name.textContent = channelName(k, count);
    const colour = document.createElement("select");
    for (const option of Object.keys(COLOURS)) colour.add(new Option(option, option, false, option === setting.colour));
    const step = queue.image.dtype === "<f4" ? (setting.max - setting.min) / 1000 || 1e-6 : 1;
    const slider = (value, label) => {
      const input = document.createElement("input");
      input.type = "range";
      input.min = String(setting.min);
      input.max = String(Math.max(setting.max, setting.min + step));
      input.step = String(step);
      input.value = String(value);
      input.title = label;
      input.setAttribute("aria-label", `${channelName(k, count)} ${label}`);
      return input;
    };
    const lo = slider(setting.lo, "min");
    const hi = slider(setting.hi, "max");
    const values = document.createElement("span");
    const show = () => { values.textContent = `${fmt(setting.lo)}–${fmt(setting.hi)}`; };
    const update = () => {
      setting.visible = visible.checked;
      setting.colour = colour.value;
      setting.lo = Math.min(Number(lo.value), Number(hi.value));
      setting.hi = Math.max(Number(hi.value), setting.lo + step / 2);
      show();
      renderChannels($("label-canvas"), queue.image, queue.channels);
    };
    for (const input of [visible, colour, lo, hi]) input.addEventListener("input", update);
    show();
    row.append(visible, name, colour, lo, hi, values);
    box.appendChild(row);
  });
}

function fmt(value) {
  return Number.isInteger(value) ? String(value) : value.toPrecision(4);
}

function buildChoices() {
  const box = $("label-choices");
  box.textContent = "";
  model.tasks.forEach((task, t) => {
    const group = document.createElement("div");
    group.className = "choice-task" + (t === queue.active ? " active" : "");
    group.dataset.task = task.name;
    const h = document.createElement("h4");
    h.textContent = `${task.name}` + (task.type === "multilabel" ? " (any number)" : "");
    group.appendChild(h);
    task.classes.forEach((cls, i) => {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.class = cls;
      button.textContent = (i < 9 ? `${i + 1} ` : "") + cls;
      button.addEventListener("mousedown", (event) => event.preventDefault());  // keep the keys the view's
      button.addEventListener("click", () => { queue.active = t; choose(cls); });
      group.appendChild(button);
    });
    box.appendChild(group);
  });
  paintChoices();
}

function paintChoices() {
  model.tasks.forEach((task, t) => {
    const group = document.querySelector(`#label-choices [data-task="${CSS.escape(task.name)}"]`);
    group.classList.toggle("active", t === queue.active);
    const value = queue.choices[task.name];
    for (const button of group.querySelectorAll("button")) {
      const chosen = Array.isArray(value) ? value.includes(button.dataset.class) : value === button.dataset.class;
      button.classList.toggle("chosen", chosen);
    }
  });
}

function choose(cls) {
  // A class for the highlighted task: set (toggled for multi-label), then on to the next task;
  // once every task has one and none is multi-label, the label is sent.
  const task = model.tasks[queue.active];
  if (!task || queue.busy) return;
  if (task.type === "multilabel") {
    const set = new Set(queue.choices[task.name] || []);
    if (set.has(cls)) set.delete(cls); else set.add(cls);
    queue.choices[task.name] = task.classes.filter((c) => set.has(c));
  } else {
    queue.choices[task.name] = cls;
    if (queue.active < model.tasks.length - 1) queue.active += 1;
  }
  paintChoices();
  const complete = model.tasks.every((t) => t.name in queue.choices);
  if (complete && model.tasks.every((t) => t.type !== "multilabel")) submitLabel();
}

async function submitLabel() {
  const item = queue.items[queue.index];
  if (!item || queue.busy) return;
  const labels = {};
  for (const task of model.tasks) {
    if (task.name in queue.choices) labels[task.name] = queue.choices[task.name];
    else if (task.type === "multilabel") labels[task.name] = [];
    else { setStatus("label-status", `choose a class for ${task.name} first`, "error"); return; }
  }
  queue.busy = true;
  try {
    const response = await fetch(`/v1/queue/${item.rank}/label`, {
      method: "POST", headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({ labels }),
    });
    if (!response.ok) {
      setStatus("label-status", `rank ${item.rank}: error ${response.status}: ${await errorText(response)}`, "error");
      if (response.status !== 409) return;
    } else {
      const record = await response.json();
      queue.count += 1;
      $("label-count").textContent = String(queue.count);
      const entry = document.createElement("li");
      entry.dataset.contribution = record.id;
      entry.textContent = `rank ${item.rank} (${item.image}): ` +
        Object.entries(record.labels).map(([t, v]) => `${t} = ${Array.isArray(v) ? v.join(", ") || "(none)" : v}`)
          .join("; ") + ` → contribution ${record.id}, ${record.status}`;
      $("label-log").prepend(entry);
      setStatus("label-status", `labelled rank ${item.rank}: contribution ${record.id} is ${record.status}`, "ok");
    }
    queue.index += 1;
    await showItem();
  } catch (err) {
    setStatus("label-status", "request failed: " + err, "error");
  } finally {
    queue.busy = false;
  }
}

async function step(delta) {
  // Skip ahead (one past the last item says the queue is done) or go back one.
  if (queue.busy) return;
  const target = Math.min(Math.max(queue.index + delta, 0), queue.items.length);
  if (target === queue.index) return;
  queue.index = target;
  setStatus("label-status", "");
  await showItem();
}

function onKey(event) {
  if (currentView() !== "label" || $("label-area").hidden) return;
  const target = event.target;
  if (target && (target.tagName === "INPUT" && target.type !== "checkbox" && target.type !== "range"
      || target.tagName === "TEXTAREA" || target.tagName === "SELECT")) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const task = model && model.tasks[queue.active];
  if (/^[1-9]$/.test(event.key) && task) {
    const cls = task.classes[Number(event.key) - 1];
    if (cls !== undefined) { event.preventDefault(); choose(cls); }
  } else if (event.key === "ArrowRight" || event.key === " ") {
    event.preventDefault();
    step(1);
  } else if (event.key === "ArrowLeft") {
    event.preventDefault();
    step(-1);
  } else if (event.key === "Enter") {
    event.preventDefault();
    submitLabel();
  }
}

// -- batch prediction -----------------------------------------------------------------------
let batchUrl = null;

function batchChunks(files) {
  // Requests within the server's limits: at most max_images files and max_upload_bytes in all.
  const { max_images: most, max_upload_bytes: bytes } = model.limits;
  const chunks = [];
  let current = [];
  let size = 0;
  for (const file of files) {
    if (current.length && (current.length >= most || size + file.size > bytes)) { chunks.push(current); current = []; size = 0; }
    current.push(file);
    size += file.size;
  }
  if (current.length) chunks.push(current);
  return chunks;
}

async function predictFiles(files) {
  // {filename, tasks} or {filename, error} per file, in order; a refused request is retried file by file.
  const form = new FormData();
  for (const file of files) form.append("image", file, file.name);
  const response = await fetch("/v1/predict", { method: "POST", body: form, headers: authHeaders() });
  if (response.ok) return (await response.json()).predictions;
  const error = `error ${response.status}: ${await errorText(response)}`;
  if (files.length === 1 || response.status === 401 || response.status === 403) {
    return files.map((file) => ({ filename: file.name, error }));
  }
  const results = [];
  for (const file of files) results.push(...await predictFiles([file]));
  return results;
}

function csvField(value) {
  const text = value === undefined || value === null ? "" : String(value);
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function batchCsv(results) {
  // The columns of a ranking CSV: pred_<task> and p_<task>_<class>, one row per file.
  const header = ["filename"];
  for (const task of model.tasks) header.push(`pred_${task.name}`, ...task.classes.map((c) => `p_${task.name}_${c}`));
  header.push("error");
  const lines = [header.map(csvField).join(",")];
  for (const r of results) {
    const row = [r.filename];
    for (const task of model.tasks) {
      const t = r.tasks && r.tasks[task.name];
      row.push(t ? (Array.isArray(t.label) ? t.label.join(";") : t.label) : "");
      row.push(...task.classes.map((c) => (t ? t.probabilities[c] : "")));
    }
    row.push(r.error || "");
    lines.push(row.map(csvField).join(","));
  }
  return lines.join("\n") + "\n";
}

function renderBatch(results) {
  const table = $("batch-table");
  const head = table.querySelector("thead");
  const body = table.querySelector("tbody");
  head.textContent = body.textContent = "";
  const header = document.createElement("tr");
  for (const text of ["#", "file", ...model.tasks.flatMap((t) => [t.name, "p"])]) {
    const th = document.createElement("th");
    th.textContent = text;
    header.appendChild(th);
  }
  head.appendChild(header);
  results.forEach((r, i) => {
    const tr = document.createElement("tr");
    tr.dataset.file = r.filename;
    const cells = [String(i + 1), r.filename];
    if (r.error) {
      cells.push(r.error);
    } else {
      for (const task of model.tasks) {
        const t = r.tasks[task.name];
        const label = Array.isArray(t.label) ? t.label.join(", ") || "(none)" : t.label;
        // The probability of the label (the least probable of a multi-label set; none for an empty one).
        const labels = Array.isArray(t.label) ? t.label : [t.label];
        cells.push(label, labels.length ? Math.min(...labels.map((c) => t.probabilities[c])).toFixed(3) : "–");
      }
    }
    cells.forEach((text, k) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (r.error && k === 2) { td.className = "error"; td.colSpan = 2 * model.tasks.length; }
      tr.appendChild(td);
    });
    body.appendChild(tr);
  });
  table.hidden = false;
}

async function predictBatch() {
  const files = [...($("batch-input").files || [])];
  if (!files.length) { setStatus("batch-status", "choose one or more images first (TIFF, PNG or NPY)", "error"); return; }
  if (!model) { setStatus("batch-status", "the model description has not loaded", "error"); return; }
  $("batch-button").disabled = true;
  try {
    const results = [];
    for (const chunk of batchChunks(files)) {
      setStatus("batch-status", `predicting ${results.length + 1}–${results.length + chunk.length} of ${files.length}…`);
      results.push(...await predictFiles(chunk));
    }
    renderBatch(results);
    if (batchUrl) URL.revokeObjectURL(batchUrl);
    batchUrl = URL.createObjectURL(new Blob([batchCsv(results)], { type: "text/csv" }));
    $("batch-download").href = batchUrl;
    $("batch-download").hidden = false;
    const failed = results.filter((r) => r.error).length;
    setStatus("batch-status", `${results.length - failed} of ${results.length} image(s) predicted` +
      (failed ? `, ${failed} refused` : ""), failed ? "error" : "ok");
  } catch (err) {
    setStatus("batch-status", "request failed: " + err, "error");
  } finally {
    $("batch-button").disabled = false;
  }
}

// -- review (curators) ----------------------------------------------------------------------
const review = { offset: 0, total: 0, generation: 0 };

async function loadReview(fresh) {
  if (fresh) { review.offset = 0; review.generation += 1; $("review-list").textContent = ""; }
  const generation = review.generation;
  const params = new URLSearchParams({ status: $("review-status-filter").value, limit: "24", offset: String(review.offset) });
  setStatus("review-status", "loading…");
  try {
    const response = await fetch("/v1/contributions?" + params, { headers: authHeaders() });
    if (!response.ok) { setStatus("review-status", `error ${response.status}: ${await errorText(response)}`, "error"); return; }
    const body = await response.json();
    if (generation !== review.generation) return;  // a fresher listing was asked for meanwhile
    review.total = body.total;
    review.offset += body.items.length;
    $("review-total").textContent = `${body.total} ${$("review-status-filter").value} contribution(s)`;
    const cards = body.items.map(reviewCard);
    $("review-list").append(...cards);
    $("review-more").hidden = review.offset >= review.total;
    setStatus("review-status", body.total ? "" : "Nothing to review.", body.total ? "" : "ok");
    for (const [card, record] of cards.map((c, i) => [c, body.items[i]])) await drawThumbnail(card, record);
  } catch (err) {
    setStatus("review-status", "request failed: " + err, "error");
  }
}

function describeLabels(labels) {
  return Object.entries(labels).map(([t, v]) => `${t}: ${Array.isArray(v) ? v.join(", ") || "(none)" : v}`).join(" · ");
}

function reviewCard(record) {
  const card = document.createElement("div");
  card.className = "review-item";
  card.dataset.id = record.id;
  card.dataset.status = record.status;
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 1;
  const labels = document.createElement("div");
  labels.className = "labels";
  labels.textContent = describeLabels(record.labels);
  const facts = document.createElement("div");
  facts.className = "muted";
  const queued = record.metadata && record.metadata.queue;
  facts.textContent = `${record.filename} · by ${record.contributor} · ${record.created_at.slice(0, 19).replace("T", " ")}` +
    (queued && queued.predicted ? ` · model guessed ${describeLabels(queued.predicted)} (rank ${queued.rank})` : "");
  const state = document.createElement("div");
  state.className = "state";
  const accept = document.createElement("button");
  accept.type = "button";
  accept.className = "accept";
  accept.textContent = "Accept";
  const reject = document.createElement("button");
  reject.type = "button";
  reject.className = "reject";
  reject.textContent = "Reject";
  accept.addEventListener("click", () => decide(card, "accept"));
  reject.addEventListener("click", () => decide(card, "reject"));
  card.append(canvas, labels, facts, accept, reject, state);
  showDecision(card, record);
  return card;
}

function showDecision(card, record) {
  card.dataset.status = record.status;
  card.querySelector(".accept").disabled = record.status === "accepted";
  card.querySelector(".reject").disabled = record.status === "rejected";
  card.querySelector(".state").textContent = record.status === "pending" ? "pending" :
    `${record.status} by ${record.reviewed_by}`;
}

async function decide(card, action) {
  for (const button of card.querySelectorAll("button")) button.disabled = true;
  try {
    const response = await fetch(`/v1/contributions/${encodeURIComponent(card.dataset.id)}/${action}`,
                                 { method: "POST", headers: authHeaders() });
    if (!response.ok) {
      card.querySelector(".state").textContent = `error ${response.status}: ${await errorText(response)}`;
      showDecision(card, { status: card.dataset.status, reviewed_by: "" });
      return;
    }
    const before = card.dataset.status;
    showDecision(card, await response.json());
    // A card that leaves (or joins) the listed status shifts where the next page starts.
    const listed = $("review-status-filter").value;
    review.offset += (card.dataset.status === listed) - (before === listed);
    setStatus("review-status", `contribution ${card.dataset.id} ${card.dataset.status}`, "ok");
  } catch (err) {
    setStatus("review-status", "request failed: " + err, "error");
  }
}

async function drawThumbnail(card, record) {
  const canvas = card.querySelector("canvas");
  try {
    const image = await fetchNpy(`/v1/contributions/${encodeURIComponent(record.id)}/image?format=npy&max_side=128`);
    renderChannels(canvas, image, autoChannels(image, 0.5, 99.5, null));
    canvas.dataset.loaded = "true";
  } catch (err) {
    canvas.title = String(err.message || err);
  }
}

// -- wiring ---------------------------------------------------------------------------------
$("predict-button").addEventListener("click", predict);
$("contribute-button").addEventListener("click", contribute);
$("api-key").addEventListener("input", keyChanged);
$("api-key").addEventListener("change", checkKey);
for (const button of document.querySelectorAll("#views button")) {
  button.addEventListener("click", () => showView(button.dataset.view));
}
$("batch-button").addEventListener("click", predictBatch);
$("label-mode").addEventListener("change", startQueue);
$("label-skip").addEventListener("click", () => step(1));
$("label-back").addEventListener("click", () => step(-1));
$("label-submit").addEventListener("click", submitLabel);
$("contrast-auto").addEventListener("click", () => {
  if (!queue.image) return;
  queue.channels = autoChannels(queue.image, Number($("contrast-low").value), Number($("contrast-high").value),
                                queue.channels);
  buildChannelControls();
  renderChannels($("label-canvas"), queue.image, queue.channels);
});
$("review-refresh").addEventListener("click", () => loadReview(true));
$("review-status-filter").addEventListener("change", () => loadReview(true));
$("review-more").addEventListener("click", () => loadReview(false));
// Buttons of the label view take no focus from a click, so Space and Enter stay the view's keys.
for (const button of document.querySelectorAll("#label-card button")) {
  button.addEventListener("mousedown", (event) => event.preventDefault());
}
document.addEventListener("keydown", onKey);
loadModel();
