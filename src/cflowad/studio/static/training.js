// cflowad studio: a new training, with the inspection region drawn as shapes on the
// folder's first image.
import { $, api, attempt, say } from "./common.js";
import { pickers } from "./pickers.js";
import { refresh, state } from "./state.js";

// Shapes are polygons in the image's own pixels (a box is its four corners); the
// region is the union of those kept less the union of those cut out, as
// cflowad.method.region.draw_region rasterizes it for training.
const region = { canvas: $("#region-canvas"), image: null, width: 0, height: 0, shapes: [], start: null, drag: null, open: null, hover: null };
pickers.train.onload = async () => {
  const query = new URLSearchParams({ root: pickers.train.root, path: pickers.train.path });
  // a folder train would refuse has no sample: asking would log a 400 on every page load
  const response = pickers.train.trainable ? await fetch(`/studio/api/sample?${query}`).catch(() => null) : null;
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

