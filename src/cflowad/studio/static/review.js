// cflowad studio: the Review view, a scored run's gallery, details, marks and drops.
import { $, PAGE, api, attempt, el, say } from "./common.js";
import { pickers } from "./pickers.js";
import { onState, refresh, state } from "./state.js";

let page = 0;
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

export async function loadGallery() {
  const runId = $("#run-select").value;
  if (!runId) return;
  const query = new URLSearchParams({ offset: page * PAGE, limit: PAGE, decision: $("#filter-decision").value, marked: $("#filter-marked").value });
  if ($("#filter-low").value !== "") query.set("low", $("#filter-low").value);
  if ($("#filter-high").value !== "") query.set("high", $("#filter-high").value);
  const data = await attempt(() => api("GET", `/studio/api/runs/${runId}/items?${query}`));
  if (!data) return;
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

onState(renderRuns);
