// imgrec's page: send images to POST /predict on this origin, show the answers and the model
// card. Plain browser JavaScript, no build step, nothing loaded from anywhere else.
"use strict";

const KEY_STORAGE = "imgrec.apiKey";
const MAX_IN_FLIGHT = 4;      // uploads sent at once; the rest wait their turn
const ASKED_LABELS = 5;       // labels asked of /predict; the select shows 1..this
const NEIGHBORS = 5;          // k asked of /search
const POLL_MS = 5000;         // service state refresh

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};

const state = {
  labels: 0,                  // the model's class count, from /model
  resize: "stretch",          // the card's resize rule: which part of a picture the model sees
  explain: true,              // ask for class maps (off when this model's graph has none)
  search: "unknown",          // "yes" | "no" | "unknown": is POST /search served here?
  images: new Map(),          // image id (sha256 of its bytes) -> preview URL, this tab only
  entries: [],                // every upload shown, in order
  waiting: [],                // entries not yet sent
  inFlight: 0,
  nextPaste: 1,
};

// ---- HTTP ------------------------------------------------------------------------------------

function apiKey() {
  try { return sessionStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

// One request; never throws. Returns {status, data, error} where error is the service's
// {"error": {"code", "message"}} (or a stand-in for a network failure / a non-JSON answer).
async function call(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", "Bearer " + key);
  let resp;
  try {
    resp = await fetch(path, { ...init, headers, credentials: "same-origin", cache: "no-store" });
  } catch (e) {
    return { status: 0, data: null, error: { code: "network", message: "the service did not answer (" + e.message + ")" } };
  }
  const type = resp.headers.get("content-type") || "";
  let data = null;
  try {
    data = type.includes("json") ? await resp.json() : await resp.text();
  } catch {
    data = null;
  }
  if (resp.ok) return { status: resp.status, data, error: null, headers: resp.headers };
  const error = data && typeof data === "object" && data.error
    ? data.error
    : { code: "http_" + resp.status, message: `HTTP ${resp.status} ${resp.statusText}`.trim() };
  return { status: resp.status, data, error, headers: resp.headers };
}

// ---- service state ---------------------------------------------------------------------------

function queueDepth(text) {
  // Prometheus text format: imgrec_queue_depth{...} 3.0 (summed over any label sets)
  let total = null;
  for (const line of text.split("\n")) {
    const m = /^imgrec_queue_depth(?:\{[^}]*\})?\s+(\S+)/.exec(line);
    if (m) total = (total || 0) + Number(m[1]);
  }
  return total;
}

async function refreshState() {
  const ready = await call("/readyz");
  const dot = $("#state-dot");
  let text;
  if (ready.status === 200) text = "ready";
  else if (ready.status === 0) text = "unreachable";
  else text = ready.error.message;
  dot.className = "dot " + (ready.status === 200 ? "ok" : ready.status === 0 ? "down" : "warn");
  $("#state-text").textContent = text;
  const metrics = await call("/metrics");
  const depth = metrics.status === 200 ? queueDepth(String(metrics.data)) : null;
  $("#queue").textContent = depth === null ? "" : `· queue ${depth} image${depth === 1 ? "" : "s"}`;
}

// ---- the model card --------------------------------------------------------------------------

function fact(dl, term, value) {
  if (value === undefined || value === null || value === "") return;
  dl.append(el("dt", { textContent: term }), el("dd", { textContent: String(value) }));
}

function bar(fraction) {
  const outer = el("span", { className: "bar" });
  outer.setAttribute("aria-hidden", "true");
  const fill = el("span", { className: "fill" });
  fill.style.width = Math.max(0, Math.min(100, fraction * 100)).toFixed(1) + "%";
  outer.append(fill);
  return outer;
}

async function loadCard() {
  const r = await call("/model");
  if (r.status === 503) { setTimeout(loadCard, 2000); return; }
  if (r.error) {
    const p = $("#card-error");
    p.textContent = "Could not read the model card: " + r.error.message;
    p.hidden = false;
    return;
  }
  $("#card-error").hidden = true;
  const m = r.data, metrics = m.metrics || {};
  state.labels = (m.labels || []).length;
  state.resize = (m.input && m.input.resize) || "stretch";
  $("#model-ref").textContent = `${m.name} v${m.version} · ${m.engine || ""} on ${m.device || "?"}`;
  $("#card-desc").textContent = (m.description || "").replace(/`([^`]*)`/g, "$1");  // Markdown code
  const dl = $("#card-facts");
  dl.replaceChildren();
  fact(dl, "name", m.name);
  fact(dl, "version", m.version);
  fact(dl, "preset", m.preset);
  fact(dl, "parameters", typeof m.parameters === "number" ? m.parameters.toLocaleString("en") : m.parameters);
  if (m.input) fact(dl, "input", `${m.input.channels} channel(s), ${m.input.size}×${m.input.size}`);
  fact(dl, "embedding", m.embedding_dim ? `${m.embedding_dim}-d` : null);
  fact(dl, "test top-1", typeof metrics.test_top1 === "number"
    ? `${metrics.test_top1.toFixed(2)} %` + (metrics.test_images ? ` of ${metrics.test_images.toLocaleString("en")} images` : "")
    : null);
  fact(dl, "labels", (m.labels || []).join(", "));
  fact(dl, "serving", [m.device, m.dtype, m.engine].filter(Boolean).join(", "));
  if (m.batching) fact(dl, "batching", `up to ${m.batching.max_batch_size} images per pass, queue ${m.batching.max_queue}`);

  const body = $("#per-class tbody");
  body.replaceChildren();
  const perClass = metrics.per_class_accuracy || {};
  for (const [label, acc] of Object.entries(perClass)) {
    body.append(el("tr", {},
      el("th", { scope: "row", textContent: label }),
      el("td", {}, bar(acc / 100), el("span", { className: "pct", textContent: `${Number(acc).toFixed(1)} %` }))));
  }
  $("#per-class").hidden = Object.keys(perClass).length === 0;
  $("#per-class").previousElementSibling.hidden = Object.keys(perClass).length === 0;

  const files = await call("/model/files");
  const plots = $("#plots");
  plots.replaceChildren();
  for (const f of (files.data && files.data.files) || []) {
    const img = el("img", { src: f.url, alt: f.title + " of " + m.name, loading: "lazy" });
    plots.append(el("figure", {}, el("a", { href: f.url }, img), el("figcaption", { textContent: f.title })));
  }
  renderAll();
}

// ---- /search discovery -----------------------------------------------------------------------

async function detectSearch() {
  const r = await call("/openapi.json");
  if (r.status === 200 && r.data && r.data.paths) {
    state.search = r.data.paths["/search"] && r.data.paths["/search"].post ? "yes" : "no";
  }
  // otherwise unknown: the first upload tries /search and a 404/405 turns it off
}

// ---- uploads ---------------------------------------------------------------------------------

function addFiles(files) {
  for (const file of files) {
    const entry = { file, url: URL.createObjectURL(file), status: "waiting", result: null,
                    error: null, ms: null, neighbors: null, node: null };
    entry.node = buildEntry(entry);
    state.entries.push(entry);
    $("#results").prepend(entry.node);
    state.waiting.push(entry);
  }
  pump();
}

function pump() {
  while (state.inFlight < MAX_IN_FLIGHT && state.waiting.length) {
    const entry = state.waiting.shift();
    state.inFlight++;
    predict(entry).finally(() => { state.inFlight--; pump(); });
  }
}

const RETRYABLE = new Set([0, 401, 429, 500, 502, 503, 504]);

async function predict(entry) {
  entry.status = "sending";
  entry.error = null;
  render(entry);
  const form = new FormData();
  form.append("file", entry.file, entry.file.name);
  const top = Math.max(1, Math.min(ASKED_LABELS, state.labels || ASKED_LABELS));
  const started = performance.now();
  let r = await call(`/predict?top_k=${top}&explain=${state.explain}`, { method: "POST", body: form });
  if (r.status === 422 && r.error && r.error.code === "explain_unavailable") {
    state.explain = false;  // a model whose graph has no class maps: predict without them
    r = await call(`/predict?top_k=${top}`, { method: "POST", body: form });
  }
  entry.ms = performance.now() - started;
  if (r.error) {
    entry.status = "failed";
    entry.error = r.error;
    entry.httpStatus = r.status;
    if (r.status === 401) askForKey(r.error.message);
    render(entry);
    return;
  }
  entry.status = "done";
  entry.result = r.data.results[0];
  state.images.set(entry.result.id, entry.url);
  render(entry);
  if (state.search !== "no") await search(entry);
}

async function search(entry) {
  const form = new FormData();
  form.append("file", entry.file, entry.file.name);
  const r = await call(`/search?k=${NEIGHBORS}`, { method: "POST", body: form });
  if ((r.status === 404 || r.status === 405) && state.search !== "yes") {
    state.search = "no";  // this server has no /search (an older or a trimmed imgrec)
    return;
  }
  if (r.error) {
    entry.neighbors = { error: r.error };
  } else {
    state.search = "yes";
    const mine = r.data.results && r.data.results[0];
    // /search never answers the query image itself; a server that did is filtered here
    entry.neighbors = ((mine && mine.neighbors) || []).filter(n => n.id !== entry.result.id);
  }
  render(entry);
}

// ---- rendering -------------------------------------------------------------------------------

function buildEntry(entry) {
  const node = $("#result-tpl").content.firstElementChild.cloneNode(true);
  const img = $(".preview", node);
  img.src = entry.url;
  img.alt = "preview of " + (entry.file.name || "the image");
  img.addEventListener("error", () => { img.classList.add("broken"); img.alt = "no preview"; });
  $(".name", node).textContent = entry.file.name || "pasted image";
  $(".retry", node).addEventListener("click", () => { state.waiting.push(entry); pump(); });
  return node;
}

function pct(score) {
  const p = score * 100;
  return p > 0 && p < 0.1 ? "<0.1 %" : `${p.toFixed(1)} %`;
}

function render(entry) {
  const node = entry.node;
  node.dataset.status = entry.status;
  node.setAttribute("aria-busy", String(entry.status === "sending"));
  $(".time", node).textContent = entry.status === "sending" ? "sending…"
    : entry.ms === null ? "waiting" : `${Math.round(entry.ms)} ms`;
  const err = $(".error", node);
  err.hidden = !entry.error;
  err.textContent = entry.error ? `${entry.error.message} (${entry.httpStatus} ${entry.error.code})` : "";
  $(".retry", node).hidden = !(entry.status === "failed" && RETRYABLE.has(entry.httpStatus));

  const list = $(".labels", node);
  list.replaceChildren();
  if (entry.result) {
    const shown = Number($("#top-k").value) || 3;
    for (const l of entry.result.labels.slice(0, shown)) {
      list.append(el("li", {},
        el("span", { className: "label", textContent: l.label }),
        bar(l.score),
        el("span", { className: "pct", textContent: pct(l.score) })));
    }
  }
  renderVerdict(entry);
  renderNeighbors(entry);
}

function renderVerdict(entry) {
  const node = entry.node, r = entry.result;
  const flag = $(".unknown", node);
  flag.hidden = !(r && r.unknown);
  flag.textContent = r && r.unknown
    ? `Unknown: not like the pictures this model was trained on (score ${r.ood_score.toFixed(0)})` : "";
  const note = $(".cam-note", node);
  note.hidden = !(r && r.cam);
  note.textContent = r && r.cam ? `Shaded: where the picture looks most like "${r.cam.label}"` : "";
  const canvas = $(".cam", node);
  canvas.hidden = !(r && r.cam);
  if (r && r.cam) drawCam(canvas, $(".preview", node), r.cam);
}

// The class map as a heat map (white = none, red = most), over the part of the preview the model
// saw: the whole picture stretched (the "stretch" rule), or its centre square
// ("shorter-side-crop"); the preview shows the picture whole ("object-fit: contain").
function drawCam(canvas, img, cam) {
  canvas.width = cam.width;
  canvas.height = cam.height;
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(cam.width, cam.height);
  cam.values.forEach((v, i) => {  // row-major: i = y * width + x
    pixels.data.set([255, Math.round(255 * (1 - v)), Math.round(255 * (1 - v)), 255], i * 4);
  });
  ctx.putImageData(pixels, 0, 0);
  const place = () => {
    const box = img.getBoundingClientRect();
    const nw = img.naturalWidth || 1, nh = img.naturalHeight || 1;
    const scale = Math.min(box.width / nw, box.height / nh);
    let w = nw * scale, h = nh * scale;
    if (state.resize === "shorter-side-crop") w = h = Math.min(w, h);
    Object.assign(canvas.style, { width: `${w}px`, height: `${h}px`,
      left: `${img.offsetLeft + (box.width - w) / 2}px`, top: `${img.offsetTop + (box.height - h) / 2}px` });
  };
  if (img.complete) place(); else img.addEventListener("load", place, { once: true });
}

function renderNeighbors(entry) {
  const box = $(".neighbors", entry.node);
  const list = $("ul", box);
  list.replaceChildren();
  box.hidden = entry.neighbors === null;
  if (entry.neighbors === null) return;
  if (entry.neighbors.error) {
    list.append(el("li", { className: "error", textContent: entry.neighbors.error.message }));
    return;
  }
  if (entry.neighbors.length === 0) {
    list.append(el("li", { className: "muted", textContent: "no other stored images yet" }));
    return;
  }
  for (const n of entry.neighbors) {
    const url = state.images.get(n.id);
    const name = n.filename || n.id.slice(0, 12) + "…";
    const item = el("li", { title: n.id });
    if (url) item.append(el("img", { src: url, alt: name, className: "thumb" }));
    else {
      // stored by another client or an earlier visit: this tab has only its filename
      const none = el("span", { className: "thumb none", textContent: "no preview" });
      none.setAttribute("aria-hidden", "true");
      item.append(none);
    }
    item.append(el("span", { className: "score", textContent: `${name} · ${n.score.toFixed(3)}` }));
    list.append(item);
  }
}

function renderAll() { for (const e of state.entries) render(e); }

// ---- the API key -----------------------------------------------------------------------------

function askForKey(message) {
  const form = $("#key-form");
  $("#key-why").textContent = message;  // the service's own words: key missing or not valid
  if (form.hidden) {
    form.hidden = false;
    $("#key").focus();
  }
}

function saveKey(ev) {
  ev.preventDefault();
  const value = $("#key").value.trim();
  if (!value) return;
  try { sessionStorage.setItem(KEY_STORAGE, value); } catch { /* private mode: this tab only */ }
  $("#key").value = "";
  $("#key-form").hidden = true;
  for (const e of state.entries) {
    if (e.status === "failed" && e.httpStatus === 401) state.waiting.push(e);
  }
  pump();
}

// ---- input: file picker, drop, paste ---------------------------------------------------------

function imageFiles(list) {
  return Array.from(list || []).filter(f => f instanceof File);
}

function wire() {
  const input = $("#files");
  input.addEventListener("change", () => { addFiles(imageFiles(input.files)); input.value = ""; });

  const drop = $("#drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, ev => { ev.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", ev => { ev.preventDefault(); addFiles(imageFiles(ev.dataTransfer.files)); });
  // a file dropped beside the zone must not navigate away from the page
  window.addEventListener("dragover", ev => ev.preventDefault());
  window.addEventListener("drop", ev => ev.preventDefault());

  document.addEventListener("paste", ev => {
    const files = [];
    for (const item of (ev.clipboardData && ev.clipboardData.items) || []) {
      if (item.kind !== "file") continue;
      const f = item.getAsFile();
      if (!f) continue;
      const ext = (f.type.split("/")[1] || "bin").replace(/[^a-z0-9]/gi, "");
      files.push(f.name && f.name !== "image." + ext ? f
        : new File([f], `pasted-${state.nextPaste++}.${ext}`, { type: f.type }));
    }
    if (files.length) { ev.preventDefault(); addFiles(files); }
  });

  $("#top-k").addEventListener("change", renderAll);
  $("#clear").addEventListener("click", () => {
    state.waiting.length = 0;
    for (const e of state.entries) e.node.remove();
    state.entries = [];  // previews stay alive: they are the neighbours' thumbnails
  });
  $("#key-form").addEventListener("submit", saveKey);
  $("#key-forget").addEventListener("click", () => {
    try { sessionStorage.removeItem(KEY_STORAGE); } catch { /* nothing stored */ }
    $("#key").value = "";
  });
}

function schedule() {
  refreshState();
  setInterval(() => { if (!document.hidden) refreshState(); }, POLL_MS);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshState(); });
}

wire();
schedule();
loadCard();
detectSearch();
