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
