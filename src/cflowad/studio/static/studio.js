// cflowad studio: the page's behaviour. Plain JS modules (one per view), no build step,
// no third-party code. The views register what they draw from the state in this order.
import "./pickers.js";
import "./models.js";
import { loadGallery } from "./review.js";
import "./live.js";
import "./training.js";
import { loadFeedback } from "./feedback.js";
import { follow, refresh } from "./state.js";
import { loadThreshold } from "./threshold.js";

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

refresh().then(() => show(location.hash.slice(1) || "models"));
follow();
