// cellclass web page, Field mode: upload a whole field of view, see its cells outlined and coloured by their
// predicted class, each cell's probabilities on hover or click, and the field's aggregated answer.
// Talks to POST /v1/fields. Uses $, authHeaders, setStatus and errorText of app.js (loaded first).
"use strict";

const FIELD_PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
  "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"];
const FIELD_NONE_COLOUR = "#9ca3af";
const SVG_NS = "http://www.w3.org/2000/svg";
let fieldResult = null;
let fieldPinned = null;

// -- the mode switch: Image (the cards of app.js) or Field ---------------------------------------
function setupFieldMode() {
  const tabs = $("views");
  if (tabs && typeof showView === "function") {
    // The page has view tabs (each view a .view element shown by showView): Field is one more.
    const button = document.createElement("button");
    button.type = "button";
    button.id = "mode-field";
    button.dataset.view = "field";
    button.textContent = "Field";
    button.addEventListener("click", () => showView("field"));
    tabs.appendChild(button);
    if (location.hash === "#field") showView("field"); else $("view-field").hidden = true;
  } else {
    document.body.classList.add("own-modes");
    const nav = document.createElement("nav");
    nav.id = "mode-switch";
    nav.setAttribute("aria-label", "Mode");
    for (const [mode, text] of [["image", "Image"], ["field", "Field"]]) {
      const button = document.createElement("button");
      button.type = "button";
      button.id = "mode-" + mode;
      button.textContent = text;
      button.addEventListener("click", () => setMode(mode));
      nav.appendChild(button);
    }
    document.querySelector("main").prepend(nav);
    setMode(location.hash === "#field" ? "field" : "image");
  }
  $("field-button").addEventListener("click", submitField);
}

function setMode(mode) {
  document.body.classList.toggle("field-mode", mode === "field");
  $("mode-image").classList.toggle("active", mode !== "field");
  $("mode-field").classList.toggle("active", mode === "field");
}

// -- the request -------------------------------------------------------------------------------
async function submitField() {
  const files = $("field-input").files;
  if (!files || !files.length) { setStatus("field-status", "choose a field first (TIFF, PNG or NPY)", "error"); return; }
  const file = files[0];
  $("field-button").disabled = true;
  setStatus("field-status", "segmenting and classifying…");
  try {
    const form = new FormData();
    form.append("image", file, file.name);
    form.append("preview", "true");
    for (const [id, name] of [["field-nucleus", "nucleus_channel"], ["field-cell", "cell_channel"],
                              ["field-aggregate", "aggregate"]]) {
      const value = $(id).value.trim();
      if (value) form.append(name, value);
    }
    const response = await fetch("/v1/fields", { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) {
      setStatus("field-status", `error ${response.status}: ${await errorText(response)}`, "error");
      return;
    }
    fieldResult = await response.json();
    fieldPinned = null;
    renderField(fieldResult);
    const seg = fieldResult.segmentation;
    setStatus("field-status", `${fieldResult.n_cells} cell(s) classified of ${seg.n_objects} object(s) found` +
      (seg.n_skipped ? ` (${seg.n_skipped} skipped at the border or by size)` : "") +
      ` by ${fieldResult.model.name}`, "ok");
  } catch (err) {
    setStatus("field-status", "request failed: " + err, "error");
  } finally {
    $("field-button").disabled = false;
  }
}

// -- drawing -----------------------------------------------------------------------------------
function cellClass(cell, task) {
  // The class a cell is coloured by: its label (single-label), or its most probable predicted label.
  const result = cell.tasks[task];
  if (!Array.isArray(result.label)) return result.label;
  if (!result.label.length) return null;
  return result.label.reduce((a, b) => (result.probabilities[b] > result.probabilities[a] ? b : a));
}

function classColour(task, name) {
  if (name === null) return FIELD_NONE_COLOUR;
  const classes = Object.keys(fieldResult.cells[0].tasks[task].probabilities);
  return FIELD_PALETTE[classes.indexOf(name) % FIELD_PALETTE.length];
}

function renderField(result) {
  const img = $("field-image");
  img.dataset.loaded = "false";
  img.onload = () => { img.dataset.loaded = "true"; };
  img.src = result.preview;
  const svg = $("field-overlay");
  svg.textContent = "";
  svg.setAttribute("viewBox", `0 0 ${result.width} ${result.height}`);
  const task = result.cells.length ? Object.keys(result.cells[0].tasks)[0] : null;
  result.cells.forEach((cell, index) => svg.appendChild(outlineElement(cell, index, task)));
  renderLegend(result, task);
  renderFieldAnswer(result.field);
  renderCellTable(result, task);
  $("field-cell-detail").textContent = result.cells.length ? "hover over or click a cell" : "no cell found";
  $("field-view").hidden = false;
}

function outlineElement(cell, index, task) {
  let shape;
  if (cell.outline && cell.outline.length >= 3) {
    shape = document.createElementNS(SVG_NS, "polygon");
    shape.setAttribute("points", cell.outline.map(([x, y]) => `${x},${y}`).join(" "));
  } else {  // no outline returned: the bounding box
    const [y0, x0, y1, x1] = cell.bbox;
    shape = document.createElementNS(SVG_NS, "rect");
    shape.setAttribute("x", x0); shape.setAttribute("y", y0);
    shape.setAttribute("width", x1 - x0); shape.setAttribute("height", y1 - y0);
  }
  const colour = classColour(task, cellClass(cell, task));
  shape.setAttribute("class", "cell-outline");
  shape.setAttribute("stroke", colour);
  shape.setAttribute("fill", colour);
  shape.dataset.index = index;
  const title = document.createElementNS(SVG_NS, "title");
  title.textContent = `cell ${cell.object_id}: ${labelText(cell.tasks[task].label)}`;
  shape.appendChild(title);
  shape.addEventListener("mouseenter", () => { if (fieldPinned === null) showCell(index); });
  shape.addEventListener("click", () => pinCell(index));
  return shape;
}

function renderLegend(result, task) {
  const legend = $("field-legend");
  legend.textContent = "";
  if (!task) return;
  const seen = new Map();
  for (const cell of result.cells) seen.set(cellClass(cell, task), (seen.get(cellClass(cell, task)) || 0) + 1);
  for (const [name, count] of seen) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = classColour(task, name);
    item.append(swatch, `${name === null ? "(no label)" : name} · ${count}`);
    legend.appendChild(item);
  }
}

function renderFieldAnswer(answer) {
  const box = $("field-answer");
  box.textContent = "";
  const title = document.createElement("h3");
  title.textContent = "Field answer";
  box.appendChild(title);
  if (!answer) { box.append("no cell was classified: no answer for the field"); return; }
  for (const [task, result] of Object.entries(answer)) {
    box.appendChild(taskBlock(task, result, task, `${result.aggregation}; thresholds: ${result.thresholds}`, 6));
  }
}

function showCell(index) {
  const cell = fieldResult.cells[index];
  const box = $("field-cell-detail");
  box.textContent = "";
  const title = document.createElement("h3");
  title.textContent = `Cell ${cell.object_id}` + (fieldPinned === index ? " (pinned; click again to release)" : "");
  const where = document.createElement("p");
  where.className = "muted";
  where.textContent = `area ${cell.area} px · centroid (${cell.centroid[1]}, ${cell.centroid[0]}) · box ` +
    `${cell.bbox.join(", ")}` + (cell.touches_border ? " · touches the border" : "");
  box.append(title, where);
  for (const [task, result] of Object.entries(cell.tasks)) box.appendChild(taskBlock(task, result, task, null, 6));
  for (const el of document.querySelectorAll("#field-overlay .cell-outline, #field-cells tbody tr")) {
    el.classList.toggle("selected", Number(el.dataset.index) === index);
  }
}

function pinCell(index) {
  fieldPinned = fieldPinned === index ? null : index;
  showCell(index);
}

function renderCellTable(result, task) {
  const body = document.querySelector("#field-cells tbody");
  body.textContent = "";
  result.cells.forEach((cell, index) => {
    const row = document.createElement("tr");
    row.dataset.index = index;
    const probabilities = cell.tasks[task].probabilities;
    const best = Math.max(...Object.values(probabilities));
    const swatch = document.createElement("i");
    swatch.style.background = classColour(task, cellClass(cell, task));
    const values = [cell.object_id, labelText(cell.tasks[task].label), (100 * best).toFixed(1) + "%", cell.area,
      cell.bbox.join(", ")];
    const first = document.createElement("td");
    first.append(swatch, String(values[0]));
    row.appendChild(first);
    for (const value of values.slice(1)) {
      const td = document.createElement("td");
      td.textContent = value;
      row.appendChild(td);
    }
    row.addEventListener("mouseenter", () => { if (fieldPinned === null) showCell(index); });
    row.addEventListener("click", () => pinCell(index));
    body.appendChild(row);
  });
  $("field-cells-task").textContent = task ? `${task}: label` : "label";
}

setupFieldMode();
