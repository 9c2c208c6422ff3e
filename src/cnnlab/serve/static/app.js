// cnnlab serve: the page. Its only backend is the JSON API (GET /api/runs, POST /api/predict);
// every drawing (heat map, mask outlines, boxes) is made here on a canvas over the uploaded
// image; a segmentation's class map goes on a second canvas beside it; a classifier's
// "where it looks" (Grad-CAM) on a third, in jet over the part of the image the model sees.
// common.js (loaded first) has $, el, count, showError, fetchJSON, loadImage, the jet colour
// map and the Grad-CAM drawing the explore page shares (inJet, drawGradcam, gradcamLegend).
"use strict";

const state = {
  runs: [], run: null, file: null, answer: null, maxUpload: 20e6, heatClass: null,
  gradcam: null, // { answer, map }: the answer's Grad-CAM in jet (inJet), made once
};
const STAGE_SIDE = 440; // CSS pixels the longer side of the shown image gets, room permitting
const PANEL_GAP = 8; // CSS pixels between the image and a segmentation's class map
const DETECT_REQUEST_THRESHOLD = 0.05; // asked of the server; the slider filters above it
const DETECTIONS_LISTED = 15; // rows in the list; every box above the threshold is drawn
const GRADCAM_SIDE = 240; // CSS pixels of the "where it looks" picture's longer side

const pct = (p) => `${(100 * p).toFixed(1)}%`;

// The number a run is judged by, from its report.json.
function headline(run) {
  const m = run.metrics;
  if (!m) return "no report yet";
  if (run.task === "classify") return `${m.split} top-1 ${pct(m.top1)}`;
  if (run.task === "segment") return `${m.split} mIoU ${m.miou.toFixed(3)}`;
  return `${m.split} mAP@0.5 ${m.map50.toFixed(3)}`;
}

async function loadRuns() {
  let body;
  try {
    body = await fetchJSON("/api/runs");
  } catch (error) {
    showError(`Cannot list the runs: ${error.message}`);
    return;
  }
  state.runs = body.runs;
  state.maxUpload = body.max_upload;
  $("limit").textContent = `${(body.max_upload / 1e6).toFixed(body.max_upload % 1e6 ? 1 : 0)} MB`;
  const list = $("run-list");
  list.replaceChildren(...state.runs.map((run) => el("li", {}, el("button", {
    type: "button", "data-run": run.id, "aria-pressed": "false", onclick: () => selectRun(run.id),
  },
  el("span", { class: "run-name" }, el("span", { class: `badge ${run.task}` }, run.task), run.name),
  el("span", { class: "run-line" }, `${run.model} · ${count(run.parameters)} params`),
  el("span", { class: "run-line" }, headline(run))))));
  list.removeAttribute("aria-busy");
  const wanted = new URLSearchParams(location.hash.slice(1)).get("run");
  selectRun(state.runs.some((r) => r.id === wanted) ? wanted : state.runs[0].id);
}

function selectRun(id) {
  state.run = state.runs.find((r) => r.id === id);
  for (const button of document.querySelectorAll("#run-list button")) {
    button.setAttribute("aria-pressed", String(button.dataset.run === id));
  }
  history.replaceState(null, "", `#run=${encodeURIComponent(id)}`);
  renderDetails(state.run);
  showError("");
  if (state.file) predict(state.file); // the same image through the newly chosen run
}

function renderDetails(run) {
  const box = $("run-details");
  const [c, h, w] = run.input_size;
  const scalars = Object.entries(run.metrics || {}).filter(([, v]) => typeof v === "number");
  const colours = run.colours;
  box.replaceChildren(...[
    el("div", { class: "details-head" },
      el("h2", {}, run.name),
      el("span", {}, el("span", { class: `badge ${run.task}` }, run.task), run.model,
        " · ", el("a", { href: `/explore?model=${encodeURIComponent(run.id)}`, class: "explore-link" }, "explore"))),
    el("div", { class: "facts" },
      el("span", {}, el("b", {}, count(run.parameters)), " parameters"),
      el("span", {}, el("b", {}, count(run.macs)), ` MACs (`, el("b", {}, count(run.flops)), ` FLOPs) at ${c}×${h}×${w}`),
      el("span", {}, el("b", {}, run.classes.length), " classes")),
    el("ul", { class: "chips", "aria-label": "classes" }, run.classes.map((name, i) => el("li", {},
      colours[i] ? el("span", { class: "swatch", style: `background:${colours[i]}` }) : null, name))),
    scalars.length ? el("table", { class: "metrics" },
      el("tr", {}, scalars.map(([k]) => el("th", {}, k))),
      el("tr", {}, scalars.map(([, v]) => el("td", {}, Number.isInteger(v) ? v : v.toFixed(4)))))
      : el("p", { class: "muted" }, "No report.json: the run has not finished."),
    Object.keys(run.figures).length ? el("details", {},
      el("summary", {}, "Training figures"),
      Object.entries(run.figures).map(([name, url]) => el("img", {
        class: "figure", src: url, alt: `${name} of ${run.name}`, loading: "lazy",
      }))) : null,
  ].filter(Boolean)); // replaceChildren would print a null as the text "null"
  box.hidden = false;
}

async function predict(file) {
  state.file = file;
  showError("");
  const refusal = uploadRefusal(file, state.maxUpload);
  if (refusal) {
    showError(refusal);
    return;
  }
  const run = state.run;
  const form = new FormData();
  form.append("run", run.id);
  form.append("file", file, file.name);
  if (run.task === "classify") {
    form.append("topk", String(Math.min(10, run.classes.length)));
    form.append("heatmaps", "true");
    form.append("explain", "true");
  }
  if (run.task === "detect") form.append("score_threshold", String(DETECT_REQUEST_THRESHOLD));
  showImage(file);
  // The server says whether the run has answered before: its first prediction also
  // prepares the model (the heat-map network, the kernels) and takes seconds longer.
  $("status").textContent = run.warm ? "predicting…"
    : `first use of ${run.name}: loading the model, then predicting (this can take several seconds)…`;
  const started = performance.now();
  let body;
  try {
    body = await fetchJSON("/api/predict", { method: "POST", body: form });
  } catch (error) {
    if (state.run !== run || state.file !== file) return; // a newer request took over
    $("status").textContent = "";
    if (!(error instanceof HttpError)) {
      showError(`The server did not answer: ${error.message}`);
      return;
    }
    // the error's text alone: no empty stage, no image the answer is not about
    $("panel").replaceChildren();
    $("result").hidden = true;
    $("raw").hidden = true;
    clearOverlay();
    showError(`${error.status}: ${error.message}`);
    return;
  }
  if (state.run !== run || state.file !== file) return; // a newer request took over
  const took = Math.round(performance.now() - started);
  run.warm = true;
  state.answer = body;
  state.heatClass = body.heatmaps ? body.heatmaps.maps[0].class : null;
  $("status").textContent = `${run.name} answered in ${took} ms`;
  renderAnswer();
  $("raw").hidden = false;
  $("json").textContent = JSON.stringify(body, (k, v) => (k === "mask_png" ? `${v.slice(0, 48)}…` : v), 2);
  $("curl").textContent = `curl -F run=${run.id} -F file=@${file.name} ${location.origin}/api/predict`;
}

// The stage stays hidden until the image has loaded: never a broken-image icon, never an
// empty box. An image the browser cannot decode (TIFF) leaves the stage hidden and says so.
function showImage(file) {
  const photo = $("photo");
  if (photo.dataset.url) URL.revokeObjectURL(photo.dataset.url);
  photo.dataset.url = URL.createObjectURL(file);
  $("stage").hidden = true;
  $("classmap").hidden = true;
  photo.onload = () => { $("stage").hidden = false; fitStage(); if (state.answer) drawOverlay(); };
  photo.onerror = () => { $("status").textContent = "this browser cannot show the image; the results are beside it"; };
  state.answer = null;
  photo.src = photo.dataset.url;
  $("result").hidden = false;
}

// The image at STAGE_SIDE on its longer side (small ones enlarged, their pixels kept sharp);
// the canvas over it at the screen's resolution.
// Never wider than the result card: on a narrow screen the image shrinks, and a
// segmentation's image and class map share the width.
function fitStage() {
  const photo = $("photo"), canvas = $("overlay"), classmap = $("classmap");
  const w = photo.naturalWidth, h = photo.naturalHeight;
  if (!w || !h) return;
  const card = $("result"), style = getComputedStyle(card);
  const room = card.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const pair = state.run && state.run.task === "segment";
  const side = Math.max(64, Math.min(STAGE_SIDE, pair ? (room - PANEL_GAP) / 2 : room));
  const scale = side / Math.max(w, h);
  const cssW = Math.round(w * scale), cssH = Math.round(h * scale);
  for (const node of [photo, canvas, classmap]) {
    node.style.width = `${cssW}px`;
    node.style.height = `${cssH}px`;
  }
  photo.classList.toggle("pixelated", scale > 2);
  for (const node of [canvas, classmap]) {
    node.width = Math.round(cssW * devicePixelRatio);
    node.height = Math.round(cssH * devicePixelRatio);
  }
  classmap.hidden = !pair || !state.answer;
}

function clearOverlay() {
  const canvas = $("overlay");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

// A 2-D context whose units are the image's own pixels.
function imageContext() {
  const canvas = $("overlay"), photo = $("photo");
  const ctx = canvas.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.setTransform(canvas.width / photo.naturalWidth, 0, 0, canvas.height / photo.naturalHeight, 0, 0);
  return ctx;
}

function renderAnswer() {
  const task = state.run.task;
  fitStage(); // the class map beside the image, for a segmentation
  const panel = $("panel");
  if (task === "classify") panel.replaceChildren(...classifyPanel(state.answer));
  else if (task === "segment") panel.replaceChildren(...segmentPanel(state.answer));
  else panel.replaceChildren(...detectPanel(state.answer));
  drawOverlay();
}

function opacitySlider(label, value, onchange) {
  const input = el("input", { type: "range", min: "0", max: "1", step: "0.05", value: String(value), "aria-label": label });
  input.addEventListener("input", () => onchange(Number(input.value)));
  return el("label", { class: "slider" }, label, input);
}

const overlay = { alpha: 0.5, threshold: 0.25 };

function classifyPanel(answer) {
  const best = answer.top[0];
  // A multi-label run lists every label above its threshold; a single-label one its top class.
  const headline = answer.labels
    ? answer.labels.map((t) => `${t.class} · ${pct(t.prob)}`).join(", ") || "no label above its threshold"
    : `${best.class} · ${pct(best.prob)}`;
  const parts = [el("p", { class: "top1", id: "top1" }, headline)];
  const mapped = new Set(answer.heatmaps ? answer.heatmaps.maps.map((m) => m.class) : []);
  const listed = answer.labels ? "Label scores" : "Top classes";
  parts.push(el("h3", {}, mapped.size ? `${listed} (pick one to see its heat map)` : listed));
  parts.push(el("ul", { class: "rows", id: "top" }, answer.top.map((t) => el("li", {},
    el("label", { class: "choice" },
      el("input", {
        type: "radio", name: "heat", value: t.class, checked: t.class === state.heatClass,
        disabled: !mapped.has(t.class), onchange: () => { state.heatClass = t.class; drawOverlay(); },
      }),
      el("span", {}, t.class),
      el("span", { class: "prob" }, el("span", { style: `width:${(100 * t.prob).toFixed(1)}%` })),
      el("span", { class: "num" }, pct(t.prob)))))));
  if (answer.heatmaps) {
    parts.push(opacitySlider("heat map opacity", overlay.alpha, (v) => { overlay.alpha = v; drawOverlay(); }));
    parts.push(...jetScale("P = 0", "per window", "1"));
    parts.push(el("p", { class: "muted", id: "peak" }));
  } else if (answer.heatmaps_error) {
    parts.push(el("p", { class: "muted" }, `No heat map: ${answer.heatmaps_error}`));
  }
  if (answer.explain && answer.explain.map_png) {
    // where it looks: the top class's Grad-CAM over the part of the image the model sees
    const found = answer.explain;
    const peak = found.peak_xy ? `, peak at (${found.peak_xy.map(Math.round).join(", ")})` : "";
    const [x0, y0, x1, y1] = found.view_box, scale = GRADCAM_SIDE / Math.max(x1 - x0, y1 - y0);
    // the caption and the scale as wide as the picture
    parts.push(el("figure", { class: "where-it-looks", style: `width:${Math.round(scale * (x1 - x0))}px` },
      el("canvas", {
        id: "gradcam", role: "img", "aria-label": `Grad-CAM of ${found.class} over the image`,
        style: `aspect-ratio:${x1 - x0} / ${y1 - y0}`,
      }),
      el("figcaption", { class: "muted" },
        `Where it looks: Grad-CAM of ${found.class} at ${found.layer}${peak}`),
      gradcamLegend(found.class, "gradcam-what")));
  } else if (answer.explain && answer.explain.error) {
    parts.push(el("p", { class: "muted" }, `No Grad-CAM: ${answer.explain.error}`));
  }
  return parts;
}

function segmentPanel(answer) {
  const run = state.run;
  const shares = Object.entries(answer.class_fractions).sort((a, b) => b[1] - a[1]);
  return [
    el("h3", {}, "Pixels per class"),
    el("ul", { class: "rows", id: "fractions" }, shares.map(([name, share]) => {
      const colour = run.colours[run.classes.indexOf(name)];
      return el("li", {}, el("span", { class: "choice" },
        el("span", { class: "swatch", style: colour ? `background:${colour}` : "background:transparent" }),
        el("span", {}, name),
        el("span", { class: "prob" }, el("span", { style: `width:${(100 * share).toFixed(1)}%;background:${colour || "#98a2b3"}` })),
        el("span", { class: "num" }, pct(share))));
    })),
    el("p", { class: "muted" }, "Left, the image with each class outlined in its colour; right, the class of every pixel."),
  ];
}

function detectPanel(answer) {
  const list = el("ul", { class: "rows", id: "detections" });
  const fill = () => {
    const shown = answer.detections.filter((d) => d.score >= overlay.threshold);
    const rows = shown.slice(0, DETECTIONS_LISTED).map((d) => el("li", {}, el("span", { class: "choice" },
      el("span", { class: "swatch", style: `background:${colourOf(d.class)}` }),
      el("span", {}, d.class),
      el("span", { class: "muted" }, d.box.map((v) => Math.round(v)).join(", ")),
      el("span", { class: "num" }, d.score.toFixed(2)))));
    if (shown.length > DETECTIONS_LISTED) rows.push(el("li", { class: "muted" }, `and ${shown.length - DETECTIONS_LISTED} more, drawn above`));
    list.replaceChildren(...(rows.length ? rows : [el("li", { class: "muted" }, "nothing above the threshold")]));
  };
  fill();
  const slider = el("input", { type: "range", min: String(DETECT_REQUEST_THRESHOLD), max: "1", step: "0.05", value: String(overlay.threshold), "aria-label": "score threshold" });
  const value = el("span", { class: "num" }, overlay.threshold.toFixed(2));
  slider.addEventListener("input", () => {
    overlay.threshold = Number(slider.value);
    value.textContent = overlay.threshold.toFixed(2);
    fill();
    drawOverlay();
  });
  return [el("h3", {}, "Detections"), list, el("label", { class: "slider" }, "score threshold", slider, value)];
}

const colourOf = (name) => state.run.colours[state.run.classes.indexOf(name)] || "red";

function drawOverlay() {
  const answer = state.answer, photo = $("photo");
  if (!answer) return;
  const task = state.run.task;
  if (task === "classify") drawWhereItLooks(answer); // its own canvas, the map alone if need be
  if (!photo.naturalWidth) return;
  if (task === "classify") drawHeatmap(answer);
  else if (task === "segment") drawMask(answer);
  else drawBoxes(answer);
}

function drawHeatmap(answer) {
  const ctx = imageContext();
  if (!answer.heatmaps) return;
  const found = answer.heatmaps.maps.find((m) => m.class === state.heatClass);
  if (!found) return;
  const [rows, cols] = found.shape;
  const cells = document.createElement("canvas");
  cells.width = cols;
  cells.height = rows;
  const pixels = cells.getContext("2d").createImageData(cols, rows);
  found.map.forEach((line, r) => line.forEach((p, col) => {
    const [red, green, blue] = jet(p);
    // fainter where the class is unlikely, so the image shows through where nothing is found
    pixels.data.set([red, green, blue, Math.round(255 * overlay.alpha * (0.25 + 0.75 * p))], 4 * (r * cols + col));
  }));
  cells.getContext("2d").putImageData(pixels, 0, 0);
  // the cells' extent is in the pixels of the image as mapped; scale it to the image's own
  const [mappedH, mappedW] = answer.heatmaps.size;
  const photo = $("photo");
  const sx = photo.naturalWidth / mappedW, sy = photo.naturalHeight / mappedH;
  const [left, right, bottom, top] = answer.heatmaps.extent;
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(cells, left * sx, top * sy, (right - left) * sx, (bottom - top) * sy);
  const [x0, y0, x1, y1] = found.peak_box; // already in the image's own pixels
  ctx.lineWidth = 2 / ctx.getTransform().a;
  ctx.strokeStyle = "#ffffff";
  ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  const peak = $("peak");
  if (peak) peak.textContent = `P(${found.class}) peaks at ${pct(found.prob)} in the window outlined (cell ${found.peak.join(", ")} of ${rows}×${cols}).`;
}

// The answer's Grad-CAM in jet at GRADCAM_ALPHA over the model's view of the image (its
// view_box: a classifier's centre crop), as the explore page and `cnnlab explain` draw it.
async function drawWhereItLooks(answer) {
  const canvas = $("gradcam");
  if (!canvas || !answer.explain || !answer.explain.map_png) return;
  if (!state.gradcam || state.gradcam.answer !== answer) {
    const grey = await loadImage(answer.explain.map_png);
    if (state.answer !== answer) return; // a newer answer took over
    state.gradcam = { answer, map: inJet(grey) };
  }
  const width = Math.round(canvas.clientWidth * devicePixelRatio);
  const height = Math.round(canvas.clientHeight * devicePixelRatio);
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d"), photo = $("photo");
  if (photo.naturalWidth) { // (an image the browser cannot show: the map alone)
    const [x0, y0, x1, y1] = answer.explain.view_box;
    ctx.imageSmoothingEnabled = width / (x1 - x0) < 2; // small images enlarged keep their pixels
    ctx.drawImage(photo, x0, y0, x1 - x0, y1 - y0, 0, 0, width, height);
  }
  drawGradcam(ctx, state.gradcam.map, width, height);
}

// Outlines, not a tint: a class colour blended over a colourful image reads as a third
// colour. Each class's region is outlined in its colour at the screen's resolution (the
// line edged in black on both sides), and the class map is drawn in solid colours beside.
function drawMask(answer) {
  imageContext(); // cleared
  const mask = new Image();
  mask.onload = () => {
    if (state.answer !== answer) return;
    const mw = mask.naturalWidth, mh = mask.naturalHeight;
    const cells = document.createElement("canvas");
    cells.width = mw;
    cells.height = mh;
    const cctx = cells.getContext("2d");
    cctx.drawImage(mask, 0, 0);
    const grey = cctx.getImageData(0, 0, mw, mh).data; // the class index, in every channel
    const rgb = state.run.colours.map((c) => (c ? [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16)) : [0, 0, 0]));
    // the class map: one solid colour per class, the background black
    const solid = cctx.createImageData(mw, mh);
    for (let i = 0; i < mw * mh; i++) solid.data.set([...rgb[grey[4 * i]], 255], 4 * i);
    cctx.putImageData(solid, 0, 0);
    const map = $("classmap"), mctx = map.getContext("2d");
    mctx.imageSmoothingEnabled = false;
    mctx.drawImage(cells, 0, 0, map.width, map.height);
    map.hidden = false;
    drawOutlines(grey, mw, mh, rgb);
  };
  mask.src = answer.mask_png;
}

function drawOutlines(grey, mw, mh, rgb) {
  const canvas = $("overlay"), W = canvas.width, H = canvas.height;
  const labels = new Uint8Array(W * H);
  for (let y = 0; y < H; y++) {
    const row = Math.min(mh - 1, Math.floor((y * mh) / H)) * mw;
    for (let x = 0; x < W; x++) labels[y * W + x] = grey[4 * (row + Math.min(mw - 1, Math.floor((x * mw) / W)))];
  }
  const line = Math.max(2, Math.round(2 * devicePixelRatio));
  const ring = new Uint8Array(W * H); // 1: on a class's outline
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      const k = labels[y * W + x];
      if (!k) continue;
      for (let d = 1; d <= line && !ring[y * W + x]; d++) {
        if ((x >= d && labels[y * W + x - d] !== k) || (x + d < W && labels[y * W + x + d] !== k)
          || (y >= d && labels[(y - d) * W + x] !== k) || (y + d < H && labels[(y + d) * W + x] !== k)) ring[y * W + x] = 1;
      }
    }
  }
  const out = new ImageData(W, H);
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      const i = y * W + x;
      if (ring[i]) out.data.set([...rgb[labels[i]], 255], 4 * i);
      else if ((x > 0 && ring[i - 1]) || (x + 1 < W && ring[i + 1]) || (y > 0 && ring[i - W]) || (y + 1 < H && ring[i + W])) {
        out.data.set([0, 0, 0, 255], 4 * i);
      }
    }
  }
  canvas.getContext("2d").putImageData(out, 0, 0);
}

function drawBoxes(answer) {
  const ctx = imageContext();
  const unit = 1 / ctx.getTransform().a; // one screen pixel, in image pixels
  ctx.lineWidth = 2 * unit;
  ctx.font = `${12 * unit}px system-ui, sans-serif`;
  const height = 16 * unit;
  // Best first: each tag is moved down past the tags of better boxes it would cover (two
  // boxes on one object), then boxes and tags are drawn lowest score first, so the best
  // box and its label end up on top and no box crosses a label.
  const shown = answer.detections.filter((x) => x.score >= overlay.threshold)
    .sort((a, b) => b.score - a.score);
  const placed = [];
  for (const d of shown) {
    const label = `${d.class} ${d.score.toFixed(2)}`;
    const width = ctx.measureText(label).width + 6 * unit;
    let x = d.box[0], y = Math.max(0, d.box[1] - height), moved = true;
    while (moved) {
      moved = false;
      for (const p of placed) {
        if (x < p.x + p.width && p.x < x + width && y < p.y + height && p.y < y + height) {
          y = p.y + height;
          moved = true;
        }
      }
    }
    placed.push({ x, y, width, label, colour: colourOf(d.class), box: d.box });
  }
  for (const p of [...placed].reverse()) {
    const [x0, y0, x1, y1] = p.box;
    ctx.strokeStyle = p.colour;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  for (const p of [...placed].reverse()) {
    ctx.fillStyle = p.colour;
    ctx.fillRect(p.x, p.y, p.width, height);
    ctx.fillStyle = "#000000";
    ctx.fillText(p.label, p.x + 3 * unit, p.y + 12 * unit);
  }
}

function wireUpload() {
  const drop = $("drop"), input = $("file");
  input.addEventListener("change", () => { if (input.files[0]) predict(input.files[0]); input.value = ""; });
  drop.addEventListener("click", (event) => { if (event.target === drop || event.target.tagName === "P") input.click(); });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); } });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) predict(file);
  });
  document.addEventListener("paste", (event) => {
    const file = [...event.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (file) predict(file);
  });
  window.addEventListener("resize", () => { fitStage(); drawOverlay(); });
}

wireUpload();
loadRuns();
