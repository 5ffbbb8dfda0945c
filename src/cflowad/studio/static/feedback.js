// cflowad studio: the Feedback view, retrain with the marks, compare, promote.
import { $, api, attempt, el, say } from "./common.js";
import { refresh, state } from "./state.js";

export async function loadFeedback() {
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

export async function promote(name, revision) {
  await attempt(async () => {
    await api("POST", `/studio/api/models/${encodeURIComponent(name)}/promote`, { revision });
    say(`revision ${revision} of ${name} is now served`, true);
    $("#comparison").replaceChildren();
    await refresh();
    loadFeedback();
  });
}

