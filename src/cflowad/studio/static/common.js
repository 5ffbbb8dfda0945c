// cflowad studio: what every view uses. Plain JS modules, no build step, no third-party code.

export const CSRF = document.querySelector('meta[name="csrf-token"]').content;
export const PAGE = 60;
export const $ = (selector, root = document) => root.querySelector(selector);
export const el = (tag, props = {}, ...children) => {
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
export const svg = (tag, props = {}) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(props)) node.setAttribute(key, value);
  return node;
};

export function say(text, ok = false) {
  const box = $("#message");
  box.textContent = text;
  box.className = ok ? "ok" : "";
  if (text) setTimeout(() => { if (box.textContent === text) box.textContent = ""; }, 8000);
}

export async function api(method, path, body) {
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

export async function attempt(action) {
  try { return await action(); } catch (error) { say(error.message); return undefined; }
}

export function fmt(value, digits = 4) {
  return value === null || value === undefined ? "–" : Number(value).toPrecision(digits);
}
export function pct(value) {
  return value === null || value === undefined ? "unknown" : `${(100 * value).toFixed(2)} %`;
}
