// cflowad studio: the Live view, hot folders and streams attached, each pushed as events.
import { $, api, attempt, el, say, svg } from "./common.js";
import { pickers } from "./pickers.js";
import { onState, refresh, state } from "./state.js";

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

onState(renderSources);
