// cflowad studio: the page's behaviour. Plain JS, no build step, no third-party code.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const PAGE = 60;
const $ = (selector, root = document) => root.querySelector(selector);
const el = (tag, props = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
};
const svg = (tag, props = {}) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(props)) node.setAttribute(key, value);
  return node;
};

let state = { models: [], jobs: [], runs: [], sources: [], roots: ["workspace"] };

function say(text, ok = false) {
  const box = $("#message");
  box.textContent = text;
  box.className = ok ? "ok" : "";
  if (text) setTimeout(() => { if (box.textContent === text) box.textContent = ""; }, 8000);
}

async function api(method, path, body) {
  const options = { method, headers: { "X-CSRF-Token": CSRF } };
  if (body instanceof FormData) options.body = body;
  else if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new Error("the studio does not answer (stopped?)");
  }
  const text = await response.text();
  let data;
  try { data = JSON.parse(text); } catch (error) { data = { error: text.slice(0, 200) }; }
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

async function attempt(action) {
  try { return await action(); } catch (error) { say(error.message); return undefined; }
}

// -- views ------------------------------------------------------------------------
function show(view) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === view));
  }
  for (const panel of document.querySelectorAll('[role="tabpanel"]')) {
    panel.hidden = panel.id !== `view-${view}`;
  }
  location.hash = view;
  if (view === "threshold") loadThreshold();
  if (view === "review") loadGallery();
  if (view === "feedback") loadFeedback();
}
for (const tab of document.querySelectorAll('[role="tab"]')) {
  tab.addEventListener("click", () => show(tab.dataset.view));
}

// -- folder pickers: only the workspace and the --allow folders ---------------------
const pickers = {};
function makePicker(container) {
  const picker = { root: "workspace", path: "", images: 0 };
  const rootSelect = el("select", { "aria-label": "Folder root" });
  const chosen = el("input", { readonly: "", "aria-label": "Chosen folder", size: 50 });
  const info = el("span", { class: "muted" });
  const folders = el("div", { class: "folders" });
  const up = el("button", { type: "button", text: "Up", onclick: () => {
    picker.path = picker.path.split("/").slice(0, -1).join("/"); picker.load();
  } });
  container.append(el("div", { class: "row" }, el("span", { text: container.getAttribute("aria-label") + ":" }),
    rootSelect, chosen, up, info), folders);
  rootSelect.addEventListener("change", () => { picker.root = rootSelect.value; picker.path = ""; picker.load(); });
  picker.setRoots = (roots) => {
    if (rootSelect.options.length === roots.length) return;
    rootSelect.replaceChildren(...roots.map((r) => el("option", { value: r, text: r })));
    rootSelect.value = picker.root;
  };
  picker.load = async () => {
    const query = new URLSearchParams({ root: picker.root, path: picker.path });
    const listing = await attempt(() => api("GET", `/studio/api/browse?${query}`));
    if (!listing) return;
    picker.images = listing.images;
    picker.files = listing.files;
    chosen.value = `${picker.root}/${picker.path}`;
    info.textContent = `${listing.images} images here`;
    if (picker.onload) picker.onload();
    folders.replaceChildren(...listing.folders.map((name) => el("button", {
      type: "button", text: `${name}/`, "aria-label": `Open folder ${name}`,
      onclick: () => { picker.path = picker.path ? `${picker.path}/${name}` : name; picker.load(); },
    })));
  };
  picker.load();
  return picker;
}
for (const container of document.querySelectorAll("[data-picker]")) {
  pickers[container.dataset.picker] = makePicker(container);
}

// -- state: polled, so that two tabs and a reload see the same --------------------
async function refresh() {
  const next = await api("GET", "/studio/api/state").catch(() => null);
  if (!next) return;
  state = next;
  for (const picker of Object.values(pickers)) picker.setRoots(state.roots);
  renderModels();
  renderJobs();
  renderModelSelects();
  renderRuns();
  renderSources();
}

function renderModelSelects() {
  const names = state.models.filter((m) => m.info).map((m) => m.name);
  for (const select of document.querySelectorAll(".model-select")) {
    const current = [...select.options].map((o) => o.value).join("|");
    if (current === names.join("|")) continue;
    const value = select.value;
    select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
    if (names.includes(value)) select.value = value;
    select.dispatchEvent(new Event("change"));
  }
}

function fmt(value, digits = 4) {
  return value === null || value === undefined ? "–" : Number(value).toPrecision(digits);
}
function pct(value) {
  return value === null || value === undefined ? "unknown" : `${(100 * value).toFixed(2)} %`;
}

function renderModels() {
  const box = $("#model-list");
  if (!state.models.length) return;
  const key = JSON.stringify(state.models);
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  const rows = state.models.map((model) => {
    const info = model.info || {};
    const training = info.training || {};
    const history = el("details", {}, el("summary", { text: `${model.revisions.length} revisions` }),
      el("table", {}, el("tr", {}, ...["revision", "kind", "when", "threshold (raw)", ""].map((h) => el("th", { text: h }))),
        ...model.revisions.map((r) => el("tr", {},
          el("td", { text: `r${r.revision}${r.revision === model.revision ? " (served)" : ""}` }),
          el("td", { text: r.kind + (r.note ? `: ${r.note}` : "") }),
          el("td", { text: (r.time || "").replace("T", " ").slice(0, 19) }),
          el("td", { text: fmt(r.threshold_raw, 6) }),
          el("td", {}, r.revision !== model.revision && r.promoted_before
            ? el("button", { type: "button", text: "Restore", "aria-label": `Restore revision ${r.revision} of ${model.name}`,
              onclick: () => promote(model.name, r.revision) })
            : null)))));
    return el("tr", {},
      el("td", {}, el("strong", { text: model.name }), el("div", { class: "muted", text: model.format })),
      el("td", { text: model.revision ? `r${model.revision}` : "–" }),
      el("td", { text: model.error ? `does not load: ${model.error}` : !model.info ? "loading…" :
        `${info.backbone || ""} ${info.decoder || ""} ${info.input_size ? `${info.input_size.width}×${info.input_size.height}` : ""}` }),
      el("td", { text: `image ${fmt(info.image_threshold_raw, 6)} / pixel ${fmt(info.pixel_threshold_raw, 6)}` }),
      el("td", { text: pct(info.image_fpr_achievable) }),
      el("td", { text: training.n_train ? `${training.n_train} train, ${training.n_calibration} held out, ${training.total_seconds} s` : "–" }),
      el("td", {}, history));
  });
  box.replaceChildren(el("table", { "aria-label": "Models" },
    el("tr", {}, ...["model", "served", "network", "thresholds (raw)", "held-out false-positive rate", "training", "history"].map((h) => el("th", { text: h }))),
    ...rows));
}

function renderJobs() {
  const box = $("#jobs");
  if (!state.jobs.length) return;
  box.replaceChildren(...state.jobs.slice(0, 12).map((job) => {
    const progress = job.progress || {};
    const total = progress.total || 1;
    const done = progress.done || 0;
    const text = job.state === "running"
      ? `${progress.step || "starting"}: ${done}/${progress.total || "?"} steps` +
        (progress.per_second ? ` · ${progress.per_second.toFixed(1)} steps/s` : "") +
        (progress.eta_seconds !== null && progress.eta_seconds !== undefined ? ` · ETA ${Math.round(progress.eta_seconds)} s` : "")
      : job.state + (job.error ? `: ${job.error}` : "") + (job.revision && job.state === "done" ? ` (revision ${job.revision})` : "");
    const bar = el("div", { role: "progressbar", "aria-label": `Training ${job.model}`,
      "aria-valuemin": 0, "aria-valuemax": total, "aria-valuenow": job.state === "done" ? total : done, "aria-valuetext": text },
    el("div", { class: "fill", style: `width:${job.state === "done" ? 100 : (100 * done) / total}%` }),
    el("span", { class: "text", text }));
    const cancel = ["queued", "running"].includes(job.state)
      ? el("button", { type: "button", text: "Cancel training", onclick: () => attempt(async () => {
        await api("POST", `/studio/api/trainings/${job.id}/cancel`); refresh();
      }) })
      : el("span");
    return el("div", { class: "job" }, el("span", { text: `${job.model} (${job.kind})` }), el("span", { text: job.state }),
      bar, cancel, job.log_tail ? el("pre", { text: job.log_tail.join("\n") }) : null);
  }));
}

// -- the inspection region, drawn as shapes on the folder's first image -------------
// Shapes are polygons in the image's own pixels (a box is its four corners); the
// region is the union of those kept less the union of those cut out, as
// cflowad.method.region.draw_region rasterizes it for training.
const region = { canvas: $("#region-canvas"), image: null, width: 0, height: 0, shapes: [], start: null, drag: null, open: null, hover: null };
pickers.train.onload = async () => {
  const query = new URLSearchParams({ root: pickers.train.root, path: pickers.train.path });
  const response = await fetch(`/studio/api/sample?${query}`).catch(() => null);
  if (!response || !response.ok) { region.canvas.hidden = true; region.image = null; return; }
  const width = Number(response.headers.get("x-image-width"));
  const height = Number(response.headers.get("x-image-height"));
  if (width !== region.width || height !== region.height) { region.shapes = []; region.open = null; }
  Object.assign(region, { width, height });
  const image = new Image();
  image.onload = () => { region.image = image; region.canvas.hidden = false; drawRegion(); };
  image.src = URL.createObjectURL(await response.blob());
};
function tracePath(context, points, scale, close = true) {
  context.beginPath();
  points.forEach(([x, y], i) => (i ? context.lineTo(x * scale, y * scale) : context.moveTo(x * scale, y * scale)));
  if (close) context.closePath();
}
function drawRegion() {
  const canvas = region.canvas;
  summarizeRegion();
  if (!region.image) return;
  canvas.width = Math.min(640, Math.max(384, region.image.width));  // small samples drawn larger
  canvas.height = Math.round(canvas.width * region.image.height / region.image.width);
  const context = canvas.getContext("2d");
  context.drawImage(region.image, 0, 0, canvas.width, canvas.height);
  const scale = canvas.width / region.width;
  const shapes = region.drag ? [...region.shapes, region.drag] : region.shapes;
  if (shapes.length) {  // outside the region: dimmed, on a layer of its own
    const layer = document.createElement("canvas");
    layer.width = canvas.width; layer.height = canvas.height;
    const dim = layer.getContext("2d");
    dim.fillStyle = "rgba(0, 0, 0, 0.5)";
    if (shapes.some((s) => !s.exclude)) dim.fillRect(0, 0, layer.width, layer.height);
    for (const cut of [false, true]) {
      for (const shape of shapes.filter((s) => s.exclude === cut)) {
        tracePath(dim, shape.points, scale);
        dim.globalCompositeOperation = "destination-out";
        dim.fill("evenodd");
        dim.globalCompositeOperation = "source-over";
        if (cut) dim.fill("evenodd");
      }
    }
    context.drawImage(layer, 0, 0);
  }
  context.lineWidth = 2;
  for (const shape of shapes) {
    tracePath(context, shape.points, scale);
    context.setLineDash(shape.exclude ? [6, 4] : []);
    context.strokeStyle = shape.exclude ? "#ff5a5a" : "#ffd400";
    context.stroke();
  }
  if (region.open) {  // the polygon being drawn, to the pointer
    const points = region.hover ? [...region.open.points, region.hover] : region.open.points;
    context.setLineDash([]);
    context.strokeStyle = region.open.exclude ? "#ff5a5a" : "#ffd400";
    tracePath(context, points, scale, false);
    context.stroke();
    context.fillStyle = context.strokeStyle;
    for (const [x, y] of region.open.points) context.fillRect(x * scale - 3, y * scale - 3, 6, 6);
  }
}
function summarizeRegion() {
  const describe = (shape) => (shape.box ? `box ${shape.box.join(",")}` : `polygon of ${shape.points.length} corners`);
  const kept = region.shapes.filter((s) => !s.exclude).map(describe);
  const cut = region.shapes.filter((s) => s.exclude).map(describe);
  let text = kept.length ? kept.join(" + ") : "the whole image";
  if (cut.length) text += `, less ${cut.join(" + ")}`;
  if (region.open) text += ` (drawing a polygon: ${region.open.points.length} corners)`;
  $("#region-summary").value = text;
}
function imagePoint(event) {  // a pointer position in the image's own pixels
  const rect = region.canvas.getBoundingClientRect();
  const x = (event.clientX - rect.left) / rect.width * region.width;
  const y = (event.clientY - rect.top) / rect.height * region.height;
  const clamp = (v, top) => Math.round(Math.max(0, Math.min(top, v)) * 10) / 10;
  return [clamp(x, region.width), clamp(y, region.height)];
}
const regionTool = () => $("#train-form").elements.region_tool.value;
const regionCut = () => $("#region-cut").checked;
function closePolygon() {
  const points = region.open ? region.open.points : [];
  region.open = null; region.hover = null;
  if (points.length >= 3) region.shapes.push({ points, exclude: regionCut() });
  drawRegion();
}
region.canvas.addEventListener("pointerdown", (event) => {
  const point = imagePoint(event);
  if (regionTool() === "box") {
    region.start = point;
    region.canvas.setPointerCapture(event.pointerId);
    return;
  }
  const open = region.open || (region.open = { points: [], exclude: regionCut() });
  const first = open.points[0];
  const pixels = region.canvas.getBoundingClientRect().width / region.width;  // screen px per image px
  const near = (p) => Math.hypot((p[0] - point[0]) * pixels, (p[1] - point[1]) * pixels) <= 8;
  if (first && open.points.length >= 3 && near(first)) closePolygon();
  else if (!open.points.length || !near(open.points[open.points.length - 1])) { open.points.push(point); drawRegion(); }
});
region.canvas.addEventListener("dblclick", () => { if (region.open) closePolygon(); });
region.canvas.addEventListener("pointermove", (event) => {
  const [x, y] = imagePoint(event);
  if (region.open) { region.hover = [x, y]; drawRegion(); return; }
  if (!region.start) return;
  const [x0, y0] = region.start;
  const left = Math.floor(Math.min(x, x0)), top = Math.floor(Math.min(y, y0));
  const right = Math.max(left + 1, Math.ceil(Math.max(x, x0))), bottom = Math.max(top + 1, Math.ceil(Math.max(y, y0)));
  region.drag = { box: [left, top, right - left, bottom - top], exclude: regionCut(),
    points: [[left, top], [right, top], [right, bottom], [left, bottom]] };
  drawRegion();
});
region.canvas.addEventListener("pointerup", () => {
  region.start = null;
  if (region.drag) region.shapes.push(region.drag);
  region.drag = null;
  drawRegion();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && region.open) { region.open = null; region.hover = null; drawRegion(); }
});
$("#region-undo").addEventListener("click", () => {
  if (region.open) region.open.points.pop();
  if (region.open && !region.open.points.length) region.open = null;
  else if (!region.open) region.shapes.pop();
  drawRegion();
});
for (const input of $("#train-form").elements.region_tool) input.addEventListener("change", () => { if (region.open) closePolygon(); });
$("#region-clear").addEventListener("click", () => { region.shapes = []; region.open = null; drawRegion(); });

$("#train-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const settings = {};
  for (const key of state.settings || []) {
    const value = form.get(key);
    if (value !== null && value !== "") settings[key] = value;
  }
  if (region.open) closePolygon();  // an unfinished polygon of three corners or more counts
  if (region.shapes.length) {
    settings.region = { width: region.width, height: region.height,
      shapes: region.shapes.map(({ points, exclude }) => ({ points, exclude })) };
  }
  const picker = pickers.train;
  attempt(async () => {
    await api("POST", "/studio/api/trainings", { name: form.get("name"), root: picker.root, path: picker.path, settings });
    say(`training ${form.get("name")} queued`, true);
    refresh();
  });
});

// -- review -----------------------------------------------------------------------
let page = 0;
let galleryItems = [];
let detailIndex = null;

function renderRuns() {
  const select = $("#run-select");
  const key = state.runs.map((r) => r.id).join("|");
  if (select.dataset.key !== key) {
    select.dataset.key = key;
    const value = select.value;
    select.replaceChildren(...state.runs.map((run) => el("option", { value: run.id, text: `${run.label} · ${run.model} · ${run.id}` })));
    if (value && state.runs.some((r) => r.id === value)) select.value = value;
    else if (state.runs.length) { select.value = state.runs[0].id; page = 0; loadGallery(); }
  }
  const run = state.runs.find((r) => r.id === select.value);
  if (run) {
    const status = `${run.state}: ${run.done} of ${run.total} scored` + (run.failed ? `, ${run.failed} unreadable` : "") + (run.error ? ` (${run.error})` : "");
    const box = $("#run-status");
    if (box.dataset.key !== `${run.id}|${status}`) {  // another run, or this one moved on
      box.dataset.key = `${run.id}|${status}`;
      box.textContent = status;
      if (!$("#view-review").hidden) loadGallery();
    }
  }
}

async function loadGallery() {
  const runId = $("#run-select").value;
  if (!runId) return;
  const query = new URLSearchParams({ offset: page * PAGE, limit: PAGE, decision: $("#filter-decision").value, marked: $("#filter-marked").value });
  if ($("#filter-low").value !== "") query.set("low", $("#filter-low").value);
  if ($("#filter-high").value !== "") query.set("high", $("#filter-high").value);
  const data = await attempt(() => api("GET", `/studio/api/runs/${runId}/items?${query}`));
  if (!data) return;
  galleryItems = data.items;
  const pages = Math.max(1, Math.ceil(data.total / PAGE));
  $("#page-label").textContent = `Page ${page + 1} of ${pages} · ${data.total} images`;
  $("#prev-page").disabled = page === 0;
  $("#next-page").disabled = page + 1 >= pages;
  $("#gallery").replaceChildren(...data.items.map((item) => card(runId, item)));
}

function card(runId, item) {
  const broken = item.score === undefined;
  const node = el("article", { class: `card ${item.anomalous ? "anomalous" : ""} ${item.mark ? `mark-${item.mark}` : ""}`, "aria-label": item.name },
    broken ? el("p", { text: `unreadable: ${item.error}` })
      : el("img", { loading: "lazy", src: `/studio/api/runs/${runId}/pictures/${item.index}/card`, alt: `${item.name} with its heat map`,
        onclick: () => openDetail(runId, item) }),
    el("div", { class: "name", title: item.name, text: item.name }),
    broken ? null : el("div", { class: "meta" },
      el("span", { text: `score ${item.score.toFixed(3)}` }),
      el("span", { class: item.anomalous ? "decision-anomalous" : "decision-normal", text: item.anomalous ? "anomalous" : "normal" }),
      el("span", { class: "muted", text: item.mark ? `marked ${item.mark}` : "" })),
    broken ? null : el("div", { class: "buttons" },
      markButton(runId, item, "good"), markButton(runId, item, "defective"),
      el("button", { type: "button", text: "Details", onclick: () => openDetail(runId, item) })));
  return node;
}

function markButton(runId, item, mark) {
  const label = mark === "good" ? "Mark good" : "Mark defective";
  return el("button", { type: "button", text: label, "aria-pressed": String(item.mark === mark),
    onclick: () => setMark(runId, item, mark) });
}

async function setMark(runId, item, mark) {
  const next = item.mark === mark ? "none" : mark;
  const saved = await attempt(() => api("POST", "/studio/api/marks", { run: runId, index: item.index, mark: next }));
  if (!saved) return;
  item.mark = next === "none" ? null : next;
  say(next === "none" ? `${item.name}: mark cleared` : `${item.name}: marked ${next} (saved)`, true);
  loadGallery();
  if (detailIndex === item.index) renderDetailButtons(runId, item);
}

function openDetail(runId, item) {
  detailIndex = item.index;
  $("#detail-title").textContent = item.name;
  $("#detail-score").textContent = `score ${item.score.toFixed(4)} (raw ${item.raw_score.toFixed(6)}) · ${item.anomalous ? "anomalous" : "normal"} · anomalous area ${(100 * item.area).toFixed(2)} % · ${item.width}×${item.height}`;
  for (const kind of ["image", "heat", "overlay"]) $(`#detail-${kind}`).src = `/studio/api/runs/${runId}/pictures/${item.index}/${kind}`;
  renderDetailButtons(runId, item);
  $("#detail").showModal();
}
function renderDetailButtons(runId, item) {
  for (const [id, mark] of [["#detail-good", "good"], ["#detail-bad", "defective"]]) {
    const button = $(id);
    button.setAttribute("aria-pressed", String(item.mark === mark));
    button.onclick = () => setMark(runId, item, mark);
  }
}
$("#detail-close").addEventListener("click", () => { $("#detail").close(); detailIndex = null; });
$("#zoom").addEventListener("input", (event) => {
  for (const img of document.querySelectorAll(".zoombox img")) img.style.width = `${100 * event.target.value}%`;
});
$("#prev-page").addEventListener("click", () => { page = Math.max(0, page - 1); loadGallery(); });
$("#next-page").addEventListener("click", () => { page += 1; loadGallery(); });
for (const id of ["#run-select", "#filter-decision", "#filter-marked", "#filter-low", "#filter-high"]) {
  $(id).addEventListener("change", () => { page = 0; loadGallery(); });
}

$("#score-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const model = $("#score-form select[name=model]").value;
  const picker = pickers.score;
  attempt(async () => {
    const run = await api("POST", "/studio/api/runs", { model, root: picker.root, path: picker.path });
    say(`scoring ${run.total} images`, true);
    await refresh();
    $("#run-select").value = run.id;
    page = 0;
    renderRuns();  // this run's status now, not the last one's
    loadGallery();
  });
});

async function uploadFiles(files) {
  const model = $("#score-form select[name=model]").value;
  if (!model) { say("choose a model first"); return; }
  let batch = "";
  for (const file of files) {
    const form = new FormData();
    form.append("image", file, file.name);
    const saved = await attempt(() => api("POST", `/studio/api/uploads?model=${encodeURIComponent(model)}&batch=${batch}`, form));
    if (saved) batch = saved.batch;
  }
  if (!batch) return;
  await attempt(async () => {
    const run = await api("POST", `/studio/api/uploads/${batch}/score?model=${encodeURIComponent(model)}`);
    await refresh();
    $("#run-select").value = run.id;
    page = 0;
    renderRuns();
    loadGallery();
  });
}
const drop = $("#drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => { event.preventDefault(); drop.classList.remove("over"); uploadFiles([...event.dataTransfer.files]); });
$("#drop-input").addEventListener("change", (event) => uploadFiles([...event.target.files]));

// -- threshold --------------------------------------------------------------------
let threshold = null;
const axis = (raw) => -Math.log(Math.max(1 - raw, 1e-12));
const fromAxis = (x) => 1 - Math.exp(-x);

async function loadThreshold() {
  const name = $("#threshold-model").value;
  if (!name) return;
  const data = await attempt(() => api("GET", `/studio/api/models/${encodeURIComponent(name)}/threshold`));
  if (!data) return;
  threshold = data;
  const values = [...data.holdout, ...data.reviewed.map((r) => r.raw), data.threshold_raw].map(axis);
  const low = Math.max(0, Math.min(...values) - 0.1);
  const high = Math.max(...values) + 0.1;
  threshold.low = low;
  threshold.high = high;
  const slider = $("#threshold-slider");
  slider.value = String(Math.round((1000 * (axis(data.threshold_raw) - low)) / (high - low)));
  $("#save-threshold").disabled = !data.can_save;
  drawHistogram();
  readout();
}

function sliderRaw() {
  const t = threshold;
  return fromAxis(t.low + ((t.high - t.low) * Number($("#threshold-slider").value)) / 1000);
}

function drawHistogram() {
  const t = threshold;
  const box = $("#histogram");
  const width = 800, height = 260, bins = 60;
  const groups = { holdout: t.holdout, unmarked: [], good: [], defective: [] };
  for (const r of t.reviewed) groups[r.mark || "unmarked"].push(r.raw);
  const colours = { holdout: "#9aa3ad", unmarked: "#8ab4f8", good: "#66bb6a", defective: "#ef5350" };
  const counts = {};
  let most = 1;
  for (const [group, values] of Object.entries(groups)) {
    counts[group] = new Array(bins).fill(0);
    for (const raw of values) {
      const bin = Math.min(bins - 1, Math.max(0, Math.floor((bins * (axis(raw) - t.low)) / (t.high - t.low))));
      counts[group][bin] += 1;
    }
  }
  for (let b = 0; b < bins; b++) most = Math.max(most, ...Object.values(counts).map((c) => c[b]));
  const nodes = [];
  const order = ["holdout", "unmarked", "good", "defective"];
  const barWidth = width / bins / order.length;
  for (let b = 0; b < bins; b++) {
    order.forEach((group, k) => {
      const count = counts[group][b];
      if (!count) return;
      const h = ((height - 30) * count) / most;
      nodes.push(svg("rect", { x: (b * width) / bins + k * barWidth, y: height - 20 - h, width: barWidth, height: h, fill: colours[group] }));
    });
  }
  const xOf = (raw) => (width * (axis(raw) - t.low)) / (t.high - t.low);
  nodes.push(svg("line", { x1: xOf(t.threshold_raw), x2: xOf(t.threshold_raw), y1: 0, y2: height - 20, stroke: "#000", "stroke-width": 2 }));
  nodes.push(svg("line", { id: "slider-line", x1: 0, x2: 0, y1: 0, y2: height - 20, stroke: "#1f6feb", "stroke-width": 2, "stroke-dasharray": "6 4" }));
  for (let i = 0; i <= 8; i++) {
    const x = t.low + ((t.high - t.low) * i) / 8;
    const label = svg("text", { x: (width * i) / 8 + 2, y: height - 5, "font-size": 11, fill: "#6b7480" });
    label.textContent = x.toFixed(2);
    nodes.push(label);
  }
  box.replaceChildren(...nodes);
}

function readout() {
  const t = threshold;
  if (!t) return;
  const raw = sliderRaw();
  const x = (width) => (width * (axis(raw) - t.low)) / (t.high - t.low);
  const line = $("#slider-line");
  if (line) { line.setAttribute("x1", x(800)); line.setAttribute("x2", x(800)); }
  const changed = t.reviewed.filter((r) => (r.raw > raw) !== (r.raw > t.threshold_raw)).length;
  const above = t.holdout.filter((v) => v > raw).length;
  const fpr = t.holdout.length ? (above + 1) / (t.holdout.length + 1) : null;
  const good = t.reviewed.filter((r) => r.mark === "good");
  const bad = t.reviewed.filter((r) => r.mark === "defective");
  $("#threshold-readout").textContent =
    `Threshold ${raw.toFixed(6)} (raw; served ${t.threshold_raw.toFixed(6)}): ` +
    `${changed} of ${t.reviewed.length} reviewed images change decision; ` +
    `held-out false-positive rate ${t.holdout.length ? pct(fpr) : "unknown (held-out scores not saved in this model)"}` +
    (good.length ? `; marked good flagged ${good.filter((r) => r.raw > raw).length} of ${good.length}` : "") +
    (bad.length ? `; marked defective caught ${bad.filter((r) => r.raw > raw).length} of ${bad.length}` : "");
}
$("#threshold-slider").addEventListener("input", readout);
$("#threshold-model").addEventListener("change", () => { if (!$("#view-threshold").hidden) loadThreshold(); });
$("#save-threshold").addEventListener("click", () => attempt(async () => {
  const name = $("#threshold-model").value;
  const saved = await api("POST", `/studio/api/models/${encodeURIComponent(name)}/threshold`, { raw: sliderRaw() });
  say(`threshold saved as revision ${saved.revision} of ${name}, now served`, true);
  await refresh();
  loadThreshold();
}));

// -- feedback: retrain, compare, promote ---------------------------------------------
async function loadFeedback() {
  const name = $("#feedback-model").value;
  const model = state.models.find((m) => m.name === name);
  if (!model) return;
  const query = new URLSearchParams({ decision: "all", marked: "marked" });
  let good = 0, bad = 0;
  const seen = new Set();
  for (const run of state.runs.filter((r) => r.model === name)) {
    const data = await api("GET", `/studio/api/runs/${run.id}/items?${query}&limit=500`).catch(() => ({ items: [] }));
    for (const item of data.items) {
      if (seen.has(item.image)) continue;
      seen.add(item.image);
      if (item.mark === "good") good += 1; else if (item.mark === "defective") bad += 1;
    }
  }
  $("#feedback-summary").textContent = `${good} images marked good, ${bad} marked defective for ${name} (served revision r${model.revision}).`;
  const candidates = model.revisions.filter((r) => r.revision > model.revision && !r.promoted_before);
  $("#candidates").replaceChildren(...(candidates.length ? candidates.map((r) => el("div", { class: "row" },
    el("span", { text: `r${r.revision} (${r.kind}, ${(r.time || "").replace("T", " ").slice(0, 19)})` }),
    el("button", { type: "button", text: "Compare", "aria-label": `Compare revision ${r.revision}`, onclick: () => compare(name, r.revision) }))) : [el("p", { class: "muted", text: "None." })]));
}
$("#feedback-model").addEventListener("change", () => { if (!$("#view-feedback").hidden) loadFeedback(); });
$("#retrain").addEventListener("click", () => attempt(async () => {
  const name = $("#feedback-model").value;
  const job = await api("POST", `/studio/api/models/${encodeURIComponent(name)}/retrain`);
  say(`retraining ${name} with ${job.extra_images.length} images marked good: see Models`, true);
  refresh();
}));

async function compare(name, revision) {
  $("#comparison").replaceChildren(el("p", { class: "muted", text: "Scoring the marked images with both revisions…" }));
  const result = await attempt(() => api("GET", `/studio/api/models/${encodeURIComponent(name)}/compare?revision=${revision}`));
  if (!result) { $("#comparison").replaceChildren(); return; }
  const decision = (a) => (a ? "anomalous" : "normal");
  $("#comparison").replaceChildren(
    el("p", { role: "status", text: `Served r${result.served} against r${result.candidate}: false alarms on images marked good ${result.false_alarms_before} → ${result.false_alarms_after} of ${result.marked_good}; defects caught among images marked defective ${result.defects_caught_before} → ${result.defects_caught_after} of ${result.marked_defective}.` }),
    el("table", { "aria-label": "Old and new revision" },
      el("tr", {}, ...["image", "mark", `r${result.served} score`, `r${result.served}`, `r${result.candidate} score`, `r${result.candidate}`].map((h) => el("th", { text: h }))),
      ...result.rows.map((row) => el("tr", {},
        el("td", { text: row.name }), el("td", { text: row.mark }),
        el("td", { text: row.old_score.toFixed(3) }), el("td", { class: `decision-${decision(row.old_anomalous)}`, text: decision(row.old_anomalous) }),
        el("td", { text: row.new_score.toFixed(3) }), el("td", { class: `decision-${decision(row.new_anomalous)}`, text: decision(row.new_anomalous) })))),
    el("button", { type: "button", class: "primary", text: "Promote", onclick: () => promote(name, revision) }));
}

async function promote(name, revision) {
  await attempt(async () => {
    await api("POST", `/studio/api/models/${encodeURIComponent(name)}/promote`, { revision });
    say(`revision ${revision} of ${name} is now served`, true);
    $("#comparison").replaceChildren();
    await refresh();
    loadFeedback();
  });
}

// -- live -------------------------------------------------------------------------
const streams = {};
$("#attach-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const picker = pickers.live;
  const kind = form.get("kind");
  const target = kind === "folder" ? `${picker.root}/${picker.path}` : form.get("target");
  attempt(async () => {
    await api("POST", "/studio/api/sources", { kind, model: form.get("model"), target, every: Number(form.get("every") || 1) });
    say("source attached", true);
    refresh();
  });
});

function renderSources() {
  const box = $("#sources");
  const ids = state.sources.map((s) => s.id);
  for (const id of Object.keys(streams)) {
    if (!ids.includes(id)) { streams[id].events.close(); streams[id].node.remove(); delete streams[id]; }
  }
  for (const source of state.sources) {
    if (streams[source.id]) continue;
    const node = el("div", { class: "source", "aria-label": `Source ${source.target}` },
      el("div", {}, el("img", { alt: `newest frame of ${source.target}` }),
        el("p", { class: "state", role: "status" })),
      el("div", {},
        el("div", { class: "row" }, el("strong", { text: `${source.kind}: ${source.target}` }), el("span", { class: "muted", text: `model ${source.model}` }),
          el("button", { type: "button", text: "Detach source", onclick: () => attempt(async () => {
            await api("POST", `/studio/api/sources/${source.id}/detach`); refresh();
          }) })),
        svg("svg", { viewBox: "0 0 600 140", preserveAspectRatio: "none", role: "img", "aria-label": "Score timeline" }),
        el("h4", { text: "Anomalous" }), el("ul", { "aria-label": "Events" })));
    box.append(node);
    const events = new EventSource(`/studio/api/sources/${source.id}/events`);
    events.onmessage = (message) => updateSource(source.id, JSON.parse(message.data));
    streams[source.id] = { node, events };
  }
}

function updateSource(id, update) {
  const entry = streams[id];
  if (!entry) return;
  const node = entry.node;
  $(".state", node).textContent = `${update.state}: ${update.scored} scored` + (update.error ? ` (${update.error})` : "");
  if (update.scored) $("img", node).src = `/studio/api/sources/${id}/frame?n=${update.scored}`;
  const line = $("svg", node);
  const history = update.history.slice(-300);
  const points = history.map((h, i) => `${(600 * i) / Math.max(1, history.length - 1)},${140 - 130 * Math.min(1, h.score)}`).join(" ");
  line.replaceChildren(
    svg("line", { x1: 0, x2: 600, y1: 140 - 65, y2: 140 - 65, stroke: "#c62828", "stroke-dasharray": "5 4" }),
    svg("polyline", { points, fill: "none", stroke: "#1f6feb", "stroke-width": 1.5 }));
  $("ul", node).replaceChildren(...update.events.slice().reverse().map((e) => el("li", { text: `${e.time.replace("T", " ").slice(0, 19)} ${e.name}: ${e.score.toFixed(3)}` })));
}

// -- start ------------------------------------------------------------------------
refresh().then(() => show(location.hash.slice(1) || "models"));
setInterval(refresh, 1000);
