// cnnlab explore: the page. Its only backend is the JSON API under /api/explore (the
// OpenAPI document at /openapi.json describes it); every drawing is made here: the layer column
// with its blocks and joins, the receptive-field chart, the box of a unit's field, a class's
// Grad-CAM in the jet colour map. common.js (loaded first) has $, el, count, showError,
// fetchJSON, loadImage and the Grad-CAM drawing the serve page shares (inJet, drawGradcam,
// gradcamLegend).
"use strict";

const state = {
  model: null, input: null, doc: null, selected: null, image: null, open: new Set(),
  field: null, cls: null, maps: 0, cams: 0, gradcam: null,
};
const SVG = "http://www.w3.org/2000/svg";
const JOIN_GUTTER = 30; // CSS pixels right of the rows where the joins' arcs are drawn (explore.css)

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

const grouped = (n) => Number(n).toLocaleString("en-US");
const shape = (s) => (s && s.length ? s.join("×") : "–");

// GET /api/explore/NAME?params: the JSON body, or an Error with the server's one line.
function api(name, params, init) {
  const query = new URLSearchParams(params || {});
  return fetchJSON(`/api/explore${name}${query.size ? `?${query}` : ""}`, init);
}

const modelParams = (extra = {}) => ({ model: state.model, ...(state.input ? { input: state.input } : {}), ...extra });

async function start() {
  const url = new URLSearchParams(location.search);
  let index;
  try {
    index = await api("");
  } catch (error) {
    showError(error.message);
    return;
  }
  state.model = url.get("model") || index.target || index.runs[0];
  state.input = url.get("input");
  if (index.runs.length) { $("runs-link").hidden = false; $("runs-sep").hidden = false; }
  $("model-name").textContent = state.model || "";
  $("samples").replaceChildren(...index.samples.map((name) => el("button", {
    type: "button", "data-sample": name, "aria-pressed": "false", onclick: () => useImage(name, name),
  }, name)));
  wireUploads(index.max_upload);
  if (!state.model) { showError("no model: start the page as /explore?model=NAME"); return; }
  try {
    state.doc = await api("/layers", modelParams());
  } catch (error) {
    $("layer-list").replaceChildren(el("li", { class: "muted" }, "no layers"));
    showError(error.message);
    return;
  }
  document.title = `${state.model} · cnnlab explore`;
  $("model-name").textContent = `${state.model} at ${shape(state.doc.input)}`;
  const d = state.doc;
  $("totals").textContent = `${d.layers.length} layers · ${grouped(d.total_params)} params · `
    + `${count(d.total_macs)} MACs · receptive field ${d.receptive_field ?? "–"} px, `
    + `stride ${d.output_stride ?? "–"}`;
  const depths = [...new Set(Object.values(d.blocks).map((b) => b.depth))].sort((a, b) => a - b);
  $("depth").replaceChildren(el("option", { value: "0" }, "0 (all closed)"),
    ...depths.map((n) => el("option", { value: String(n) }, String(n))));
  const initial = depths.length > 1 ? 1 : (depths[0] || 0);
  $("depth").value = String(initial);
  $("depth").addEventListener("change", () => openToDepth(Number($("depth").value)));
  openToDepth(initial, false);
  const first = d.layers.find((l) => l.spatial) || d.layers[0];
  selectLayer(first.index);
  drawChart();
  window.addEventListener("resize", () => { drawJoins(); drawChart(); drawField(); });
}

// ---- the layer column ----------------------------------------------------------------

function openToDepth(depth, redraw = true) {
  state.open = new Set(Object.entries(state.doc.blocks).filter(([, b]) => b.depth <= depth).map(([n]) => n));
  if (state.selected !== null) revealLayer(state.selected);
  renderColumn();
  if (redraw) drawChart();
}

function revealLayer(index) {
  for (const name of state.doc.layers[index].blocks) state.open.add(name);
}

// The rows as a tree of blocks: each block a header (click: open or close) over its rows,
// a join (add, concatenation) after the row it follows.
function renderColumn() {
  const d = state.doc;
  // A join goes after the row it follows, or first in its block when the block starts
  // with it (a DenseLayer concatenates its inputs before its first layer).
  const joinsAt = new Map();
  d.joins.forEach((join, i) => {
    const block = d.blocks[join.block];
    const key = block && block.rows[0] > join.after ? `before ${block.rows[0]}` : `after ${join.after}`;
    if (!joinsAt.has(key)) joinsAt.set(key, []);
    joinsAt.get(key).push(i);
  });
  const joinItem = (j) => {
    const join = d.joins[j];
    const sources = join.from.filter((f) => f !== join.after);
    const named = sources.map((f) => (f === -1 ? "the input" : f === null ? "an earlier result" : d.layers[f].name));
    const text = join.kind === "add"
      ? `⊕ + x: adds ${named.join(", ") || "its own input"} → ${shape(join.output)}`
      : `⧺ concatenates ${join.inputs.length} maps (${join.inputs.map((s) => s[0]).join(" + ")} channels) → ${shape(join.output)}`;
    return el("li", {
      class: "join", "data-join": String(j), title: `${join.kind} in ${join.block}: ${named.join(", ")}`,
    }, text);
  };
  const root = el("ol", { class: "layer-list", id: "layer-list" });
  const stack = [{ name: null, list: root }];
  d.layers.forEach((layer) => {
    const blocks = layer.blocks;
    while (stack.length > 1 && !blocks.includes(stack[stack.length - 1].name)) stack.pop();
    for (const name of blocks.slice(stack.length - 1)) {
      const block = d.blocks[name];
      const isOpen = state.open.has(name);
      const parentOpen = stack.every((s) => s.name === null || (state.open.has(s.name) && !s.hidden));
      // Its output: its last row's, or the join it ends with (a DenseBlock's concatenation).
      const closing = d.joins.filter((j) => j.block === name && j.after === block.rows[1]).pop();
      const output = closing ? closing.output : d.layers[block.rows[1]].output_shape;
      const params = d.layers.slice(block.rows[0], block.rows[1] + 1).reduce((a, l) => a + l.params, 0);
      const head = el("button", {
        type: "button", class: "block-head", "data-block": name, "aria-expanded": String(isOpen),
        onclick: () => toggleBlock(name), title: `${name} (${block.type})`,
      }, el("span", {}, el("span", { class: "caret" }, isOpen ? "▾" : "▸"), `${blockLabel(name)} `,
        el("span", { class: "type" }, block.type)),
      el("span", { class: "shape" }, `${shape(output)} · ${count(params)}`));
      const children = el("ol", { hidden: isOpen ? null : "" });
      const item = el("li", { hidden: parentOpen ? null : "" }, head, children);
      stack[stack.length - 1].list.append(item);
      stack.push({ name, list: children, hidden: !parentOpen });
    }
    for (const j of joinsAt.get(`before ${layer.index}`) || []) stack[stack.length - 1].list.append(joinItem(j));
    const row = el("button", {
      type: "button", class: "layer-row", "data-layer": String(layer.index),
      "aria-pressed": String(layer.index === state.selected), onclick: () => selectLayer(layer.index),
      title: `${layer.name} (${layer.type})`,
    }, el("span", { class: "name" }, `${layer.name.split(".").pop()} `, el("span", { class: "type" }, layer.type)),
    el("span", { class: "shape" }, shape(layer.output_shape)));
    stack[stack.length - 1].list.append(el("li", {}, row));
    for (const j of joinsAt.get(`after ${layer.index}`) || []) stack[stack.length - 1].list.append(joinItem(j));
  });
  $("layer-list").replaceWith(root);
  $("layer-column").removeAttribute("aria-busy");
  drawJoins();
}

// A block's shown name: a short path whole (layer1.0), a long one by its last part
// (features.denseblock1 -> denseblock1); the header's title has the whole path.
const blockLabel = (name) => (name.length > 16 ? name.split(".").pop() : name);

function toggleBlock(name) {
  if (state.open.has(name)) state.open.delete(name); else state.open.add(name);
  renderColumn();
}

// A visible element for a row: itself, or the header of the outermost closed block it is in.
function visibleRow(index) {
  if (index < 0) return null;
  const layer = state.doc.layers[index];
  for (const name of layer.blocks) {
    if (!state.open.has(name)) return document.querySelector(`[data-block="${CSS.escape(name)}"]`);
  }
  return document.querySelector(`[data-layer="${index}"]`);
}

// Each join's skip: an arc on the right of the column from the row that made an input to
// the join (the other input is the row just above it).
function drawJoins() {
  const box = $("joins");
  const column = $("layer-column");
  box.replaceChildren();
  box.setAttribute("width", column.scrollWidth);
  box.setAttribute("height", column.scrollHeight);
  const origin = column.getBoundingClientRect();
  const y = (node) => {
    const r = node.getBoundingClientRect();
    return r.top - origin.top + column.scrollTop + r.height / 2;
  };
  const right = column.clientWidth - JOIN_GUTTER; // the arcs bend into the column's gutter
  state.doc.joins.forEach((join, j) => {
    const marker = document.querySelector(`[data-join="${j}"]`);
    if (!marker || marker.offsetParent === null) return;
    const to = y(marker);
    for (const from of join.from) {
      if (from === null || from === join.after) continue;
      const source = from === -1 ? $("layer-column").querySelector(".layer-row") : visibleRow(from);
      if (!source || source.offsetParent === null) continue;
      const at = y(source);
      if (to - at < 4) continue;
      const bend = Math.min(JOIN_GUTTER - 4, 6 + (to - at) / 10);
      box.append(svg("path", { d: `M ${right} ${at} C ${right + bend} ${at}, ${right + bend} ${to}, ${right} ${to}` }));
    }
  });
}

// ---- the selected layer ----------------------------------------------------------------

function selectLayer(index) {
  state.selected = index;
  const layer = state.doc.layers[index];
  const hidden = layer.blocks.some((name) => !state.open.has(name));
  if (hidden) { revealLayer(index); renderColumn(); }
  for (const button of document.querySelectorAll(".layer-row")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.layer) === index));
  }
  document.querySelector(`[data-layer="${index}"]`)?.scrollIntoView({ block: "nearest" });
  renderDetails(layer);
  drawChart();
  state.field = null;
  drawField();
  if (state.image) showMaps();
}

function renderDetails(layer) {
  const rf = layer.rf === null ? "– (no spatial output)"
    : layer.rf_min !== null && layer.rf_min !== layer.rf ? `${layer.rf_min} to ${layer.rf} px` : `${layer.rf} px`;
  const rows = [
    ["output", el("span", { id: "layer-output" }, shape(layer.output_shape))],
    ["size", el("span", { id: "layer-size-formula", class: "formula" }, layer.size_formula || "–")],
    ["parameters", el("span", { id: "layer-param-formula", class: "formula" }, layer.formula || "0 (no parameters)")],
    ["MACs", el("span", { id: "layer-macs" }, grouped(layer.macs))],
    ["receptive field", el("span", { id: "layer-rf" }, rf)],
    ["jump", el("span", { id: "layer-jump" }, layer.jump === null ? "–" : `${layer.jump} px`)],
    ["so far", `${grouped(layer.params_so_far)} params · ${count(layer.macs_so_far)} MACs`],
  ];
  if (layer.blocks.length) rows.push(["in", layer.blocks.join(" › ")]);
  $("layer-details").replaceChildren(
    el("h2", { id: "layer-title" }, `${layer.index}. ${layer.name} `, el("span", { class: "muted" }, layer.type)),
    el("dl", { class: "details-grid" }, rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])));
  $("layer-details").hidden = false;
}

// ---- the receptive-field chart ----------------------------------------------------------

function drawChart() {
  const chart = $("rf-chart");
  const layers = state.doc ? state.doc.layers.filter((l) => l.rf !== null) : [];
  chart.replaceChildren();
  if (!layers.length) return;
  const width = chart.clientWidth || 600;
  const height = chart.clientHeight || 190;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const pad = { left: 44, right: 12, top: 10, bottom: 24 };
  const n = state.doc.layers.length;
  const top = Math.max(...layers.map((l) => l.rf));
  const x = (i) => pad.left + (i / Math.max(1, n - 1)) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - (v / top) * (height - pad.top - pad.bottom);
  chart.append(svg("line", { class: "axis", x1: pad.left, x2: width - pad.right, y1: y(0), y2: y(0) }));
  chart.append(svg("line", { class: "axis", x1: pad.left, x2: pad.left, y1: pad.top, y2: y(0) }));
  for (const v of [0, top / 2, top]) {
    chart.append(svg("text", { x: pad.left - 6, y: y(v) + 4, "text-anchor": "end" }, Math.round(v)));
  }
  chart.append(svg("text", { x: pad.left, y: height - 6 }, "layer 0"));
  chart.append(svg("text", { x: width - pad.right, y: height - 6, "text-anchor": "end" }, `layer ${n - 1}`));
  const line = (key) => layers.map((l, i) => `${i ? "L" : "M"} ${x(l.index).toFixed(1)} ${y(l[key]).toFixed(1)}`).join(" ");
  chart.append(svg("path", { class: "rf", d: line("rf") }));
  chart.append(svg("path", { class: "jump", d: line("jump") }));
  const chosen = state.doc.layers[state.selected];
  if (chosen && chosen.rf !== null) {
    chart.append(svg("line", { class: "marker", x1: x(chosen.index), x2: x(chosen.index), y1: pad.top, y2: y(0) }));
    chart.append(svg("text", { x: Math.min(x(chosen.index) + 4, width - 90), y: pad.top + 10 }, `${chosen.rf} px, jump ${chosen.jump}`));
  }
  const step = (width - pad.left - pad.right) / Math.max(1, n - 1);
  for (const l of layers) {
    const hit = svg("rect", { class: "hit", x: x(l.index) - step / 2, y: pad.top, width: Math.max(step, 1), height: y(0) - pad.top });
    hit.append(svg("title", {}, `${l.index}. ${l.name}: field ${l.rf} px, jump ${l.jump}`));
    hit.addEventListener("click", () => selectLayer(l.index));
    chart.append(hit);
  }
}

// ---- images, maps, fields --------------------------------------------------------------

function wireUploads(maxUpload) {
  const send = async (file) => {
    if (!file) return;
    const refusal = uploadRefusal(file, maxUpload);
    if (refusal) { showError(refusal); return; }
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const body = await api("/images", {}, { method: "POST", body: form });
      useImage(body.image, file.name);
    } catch (error) { showError(error.message); }
  };
  $("file").addEventListener("change", () => send($("file").files[0]));
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => { event.preventDefault(); send(event.dataTransfer.files[0]); });
  document.addEventListener("paste", (event) => {
    const item = [...event.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) send(item.getAsFile());
  });
}

async function useImage(token, label) {
  state.image = token;
  for (const b of document.querySelectorAll("[data-sample]")) b.setAttribute("aria-pressed", String(b.dataset.sample === token));
  showError("");
  try {
    const view = await api("/view", modelParams({ image: token }));
    const img = $("input-view");
    await new Promise((resolve) => { img.onload = resolve; img.src = view.png; });
    $("input-caption").textContent = `${label}, as the model sees it: ${shape(view.size)} (resized, centre-cropped)`;
    $("image-area").hidden = false;
  } catch (error) { showError(error.message); return; }
  state.field = null;
  drawField();
  if (state.doc.classes) showClasses();
  showMaps();
}

async function showMaps() {
  const layer = state.doc.layers[state.selected];
  const card = $("maps-card");
  card.hidden = false;
  $("maps-title").textContent = `Feature maps of ${layer.name}`;
  if (!layer.spatial) {
    $("maps").replaceChildren(el("p", { class: "muted" }, `${layer.name} outputs ${shape(layer.output_shape)}: no maps to show.`));
    return;
  }
  const asked = ++state.maps;
  $("maps").setAttribute("aria-busy", "true");
  let body;
  try {
    body = await api("/maps", modelParams({ layer: layer.index, image: state.image }));
  } catch (error) { showError(error.message); return; }
  if (asked !== state.maps) return; // another layer was opened meanwhile
  const [channels, h, w] = body.shape;
  $("maps-title").textContent = `Feature maps of ${layer.name}: the ${body.channels.length} most active of ${channels}, ${h}×${w} each`;
  $("maps").replaceChildren(...body.channels.map((c) => {
    const img = el("img", { src: c.png, alt: `channel ${c.channel}`, "data-channel": String(c.channel), width: w, height: h });
    img.addEventListener("click", (event) => {
      const r = img.getBoundingClientRect();
      const col = Math.min(w - 1, Math.floor(((event.clientX - r.left) / r.width) * w));
      const row = Math.min(h - 1, Math.floor(((event.clientY - r.top) / r.height) * h));
      pickUnit(layer.index, row, col, img);
    });
    return el("figure", { class: "map" }, img, el("figcaption", {}, `#${c.channel} · mean ${c.mean.toFixed(2)}`));
  }));
  $("maps").removeAttribute("aria-busy");
  $("maps").dataset.layer = String(layer.index); // which layer the thumbnails show
  if (state.doc.classes) showGradcam();
}

async function pickUnit(index, row, col, img) {
  let found;
  try {
    found = await api("/field", modelParams({ layer: index, y: row, x: col }));
  } catch (error) { showError(error.message); return; }
  state.field = found;
  for (const old of document.querySelectorAll(".map .unit")) old.remove();
  const [, h, w] = state.doc.layers[index].output_shape;
  const mark = el("span", { class: "unit" });
  mark.style.left = `${(100 * col) / w}%`;
  mark.style.top = `${(100 * row) / h}%`;
  mark.style.width = `${100 / w}%`;
  mark.style.height = `${100 / h}%`;
  img.parentElement.append(mark);
  drawField();
}

// The picked unit's field: its box on the input (dashed where it lies in the padding), its
// centre, and the chain of layers that grew it.
function drawField() {
  const canvas = $("input-overlay");
  const img = $("input-view");
  const box = $("field");
  const ctx = canvas.getContext("2d");
  canvas.width = img.clientWidth * devicePixelRatio;
  canvas.height = img.clientHeight * devicePixelRatio;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const f = state.field;
  if (state.gradcam) drawGradcam(ctx, state.gradcam, canvas.width, canvas.height);
  if (!f) { box.hidden = true; return; }
  const [, height, width] = f.input;
  const sx = canvas.width / width;
  const sy = canvas.height / height;
  const [x0, y0, x1, y1] = f.box;
  ctx.lineWidth = 2 * devicePixelRatio;
  ctx.strokeStyle = "#f97316";
  ctx.setLineDash([5 * devicePixelRatio, 4 * devicePixelRatio]);
  ctx.strokeRect(x0 * sx, y0 * sy, (x1 - x0 + 1) * sx, (y1 - y0 + 1) * sy);
  ctx.setLineDash([]);
  const [i0, j0, i1, j1] = f.inside;
  ctx.fillStyle = "rgba(249, 115, 22, 0.18)";
  ctx.fillRect(i0 * sx, j0 * sy, (i1 - i0 + 1) * sx, (j1 - j0 + 1) * sy);
  ctx.strokeRect(i0 * sx, j0 * sy, (i1 - i0 + 1) * sx, (j1 - j0 + 1) * sy);
  const [cx, cy] = f.centre;
  ctx.fillStyle = "#f97316";
  ctx.beginPath();
  ctx.arc((cx + 0.5) * sx, (cy + 0.5) * sy, 4 * devicePixelRatio, 0, 2 * Math.PI);
  ctx.fill();
  const outside = x0 < 0 || y0 < 0 || x1 >= width || y1 >= height;
  box.replaceChildren(
    el("h3", {}, `Unit (y ${f.unit[0]}, x ${f.unit[1]}) of ${f.name}`),
    el("p", {
      id: "field-box", "data-layer": String(f.layer), "data-unit": f.unit.join(","),
      "data-box": f.box.join(","), "data-inside": f.inside.join(","),
    },
      `sees x ${x0} to ${x1}, y ${y0} to ${y1}: ${f.size[0]}×${f.size[1]} px, centre (${cx}, ${cy})`
      + (outside ? `; on the input x ${i0} to ${i1}, y ${j0} to ${j1} (the rest is padding, dashed)` : "")),
    el("p", { class: "muted" }, `Neighbouring units are ${f.jump[0]} px apart (the jump).`),
    el("p", {}, "How the field grew (rf + (k − 1)·jump):"),
    el("ol", { id: "field-chain" }, f.chain.map((c) => el("li", {},
      el("b", {}, c.name), ` ${c.type} → ${shape(c.output)}: `, el("span", { class: "formula" }, c.step),
      `, jump ${c.jump}`))));
  box.hidden = false;
}

// ---- a classifier run: classes and Grad-CAM ----------------------------------------------

async function showClasses() {
  let body;
  try { body = await api("/classes", { model: state.model, image: state.image }); } catch (error) { showError(error.message); return; }
  state.cls = state.cls && body.top.some((t) => t.class === state.cls) ? state.cls : body.top[0].class;
  $("classes").replaceChildren(el("span", { class: "muted" }, "Top classes (click: its Grad-CAM at this layer):"),
    ...body.top.map((t) => el("button", {
      type: "button", "data-class": t.class, "aria-pressed": String(t.class === state.cls),
      onclick: () => { state.cls = t.class; showClasses(); },
    }, `${t.class} ${(100 * t.prob).toFixed(1)}%`)));
  $("classes").hidden = false;
  showGradcam();
}

async function showGradcam() {
  const layer = state.doc.layers[state.selected];
  const asked = ++state.cams;
  state.gradcam = null;
  $("gradcam-legend").hidden = true;
  if (!state.cls || !layer.spatial) { drawField(); return; }
  try {
    const body = await api("/gradcam", { model: state.model, layer: layer.index, image: state.image, class: state.cls });
    const heat = await loadImage(body.map_png);
    if (asked !== state.cams) return; // another layer or class was asked for meanwhile
    state.gradcam = inJet(heat);
    $("input-caption").textContent = `${$("input-caption").textContent.split(" · ")[0]} · Grad-CAM of ${body.class} at ${layer.name}`;
    $("gradcam-legend").replaceChildren(...gradcamLegend(body.class, "gradcam-what"));
    $("gradcam-legend").hidden = false;
  } catch (error) { showError(error.message); }
  drawField();
}

start();
