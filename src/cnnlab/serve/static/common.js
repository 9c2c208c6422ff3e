// cnnlab's two pages, serve (app.js) and explore (explore.js), share these: a plain script
// each page loads first (its top-level names are the pages' globals, no build step).
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value; // CSSOM: allowed by the page's CSP
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function count(n) {
  if (n === null || n === undefined) return "?";
  for (const [size, unit] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (n >= size) return `${(n / size).toFixed(n >= 10 * size ? 1 : 2)} ${unit}`;
  }
  return String(n);
}

// The page's one-line error box (#error); an empty text hides it.
function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

// The server answered with an error status: `message` is its one line ({"detail": ...}).
class HttpError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// fetch(url, init)'s JSON body; an error status throws an HttpError with the server's line,
// no answer at all the fetch's own TypeError.
async function fetchJSON(url, init) {
  const response = await fetch(url, init);
  if (response.ok) return response.json();
  const body = await response.json().catch(() => ({}));
  throw new HttpError(response.status, body.detail || response.statusText);
}

// Said before sending a file the server would refuse for its size; "" when it fits.
function uploadRefusal(file, limit) {
  return file.size > limit
    ? `${file.name}: ${count(file.size)}B is larger than the server's limit of ${count(limit)}B`
    : "";
}

// jet, the colour map of cnnlab's heat-map pictures (`cnnlab heatmap`, `cnnlab explain`,
// matplotlib's "jet"): t in [0, 1] -> [r, g, b], dark blue (0) to dark red (1).
function jet(t) {
  const c = (x) => Math.round(255 * Math.min(1, Math.max(0, 1.5 - Math.abs(x))));
  return [c(4 * t - 3), c(4 * t - 2), c(4 * t - 1)];
}

// An image (a data: or blob: URL) once the browser has decoded it.
function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser cannot decode the image"));
    image.src = src;
  });
}

// ---- Grad-CAM, as both pages and `cnnlab explain`'s pictures draw it -------------------

const GRADCAM_ALPHA = 0.5; // the map over the image, as `cnnlab explain` draws it

// The server's map is grey (its value, 0 to 255, in every channel): in jet, at its own size.
function inJet(grey) {
  const canvas = document.createElement("canvas");
  canvas.width = grey.naturalWidth;
  canvas.height = grey.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(grey, 0, 0);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    pixels.data.set([...jet(pixels.data[i] / 255), 255], i);
  }
  ctx.putImageData(pixels, 0, 0);
  return canvas;
}

// The jet map (inJet's canvas) over what `ctx` already shows, stretched to width x height.
function drawGradcam(ctx, map, width, height) {
  ctx.save();
  ctx.globalAlpha = GRADCAM_ALPHA;
  ctx.imageSmoothingEnabled = true; // bilinear, as the explain pictures' map
  ctx.drawImage(map, 0, 0, width, height);
  ctx.restore();
}

// The colour bar of jet and the words under its two ends and its middle.
function jetScale(low, middle, high) {
  return [
    el("div", { class: "colourbar", "aria-hidden": "true" }),
    el("div", { class: "scale", "aria-hidden": "true" },
      el("span", {}, low), el("span", {}, middle), el("span", {}, high)),
  ];
}

// The line under a Grad-CAM map: what its colours mean.
const gradcamMeaning = (className) => `High (red, 1 = the map's peak): where the evidence for`
  + ` ${className} is strongest; dark blue (0): none.`;

// A Grad-CAM's legend: the scale and the line saying what high is.
function gradcamLegend(className, id) {
  return [...jetScale("0", "Grad-CAM", "1"), el("p", { class: "muted", id }, gradcamMeaning(className))];
}
