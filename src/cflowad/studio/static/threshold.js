// cflowad studio: the Threshold view, a histogram and a slider on the raw score's axis.
import { $, api, attempt, pct, say, svg } from "./common.js";
import { refresh } from "./state.js";

let threshold = null;
const axis = (raw) => -Math.log(Math.max(1 - raw, 1e-12));
const fromAxis = (x) => 1 - Math.exp(-x);

export async function loadThreshold() {
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

