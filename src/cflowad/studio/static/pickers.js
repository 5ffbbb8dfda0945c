// cflowad studio: folder pickers, only the workspace and the --allow folders.
import { api, attempt, el } from "./common.js";
import { onState, state } from "./state.js";

export const pickers = {};
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
    picker.trainable = listing.trainable;
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

onState(() => {
  for (const picker of Object.values(pickers)) picker.setRoots(state.roots);
});
