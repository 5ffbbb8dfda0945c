// cflowad studio: the state every view draws from, pushed by the server when it changes
// (two tabs and a reload see the same); refresh() asks once, right after this tab
// changed something.
import { api } from "./common.js";

export let state = { models: [], jobs: [], runs: [], sources: [], roots: ["workspace"] };
const renderers = [];

/** Call ``render`` after every new state, in the order the views registered. */
export function onState(render) {
  renderers.push(render);
}

export async function refresh() {
  const next = await api("GET", "/studio/api/state").catch(() => null);
  if (next) apply(next);
}

function apply(next) {
  state = next;
  for (const render of renderers) render();
}

/** Follow the server's state events (the browser reconnects by itself). */
export function follow() {
  new EventSource("/studio/api/state/events").onmessage = (event) => apply(JSON.parse(event.data));
}
