// cflowad studio: the Models view, the list of models and of trainings.
import { $, api, attempt, el, fmt, pct } from "./common.js";
import { promote } from "./feedback.js";
import { onState, refresh, state } from "./state.js";

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

onState(renderModels);
onState(renderJobs);
onState(renderModelSelects);
