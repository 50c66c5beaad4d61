// The page's client: reads GET /models, sends each image to POST /predict/{model} on its own,
// and shows the answers. Only the public API is used, so this file is also a worked example of
// a client. Server text is only ever set as textContent, never parsed as HTML.
"use strict";

const KEY_STORAGE = "kos-api-key";
const $ = (id) => document.getElementById(id);

const state = {
  models: [], // every version /models lists
  asked: "", // the model, version and top k the images on the page were last sent to
  items: [], // one per image on the page: {file, url, el, run}
};

// ---- talking to the service -------------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { "X-API-Key": key } : {};
}

// fetch, and the JSON body with a readable error message whatever went wrong.
async function call(path, init = {}) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
  } catch (err) {
    return { ok: false, status: 0, detail: "the service could not be reached (" + err.message + ")" };
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (response.ok) return { ok: true, status: response.status, body };
  const detail = body && typeof body.detail === "string" ? body.detail : response.statusText || "request failed";
  return { ok: false, status: response.status, detail, retryAfter: response.headers.get("Retry-After") };
}

function describeError(result) {
  if (result.status === 0) return result.detail;
  let text = result.status + ": " + result.detail;
  if (result.retryAfter) text += " (retry after " + result.retryAfter + " s)";
  return text;
}

// ---- the API key ------------------------------------------------------------------------

function askForKey(message) {
  $("key-panel").hidden = false;
  const error = $("key-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("key-input").focus();
}

function setupKeyForm() {
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    if (await loadModels()) {
      for (const item of state.items) if (item.el.classList.contains("failed")) classify(item);
    }
  });
}

// ---- models -----------------------------------------------------------------------------

async function loadModels() {
  const result = await call("/models");
  if (result.status === 401) {
    const sent = sessionStorage.getItem(KEY_STORAGE);
    sessionStorage.removeItem(KEY_STORAGE);
    $("workspace").hidden = true;
    setStatus("");
    askForKey(sent ? "The key was refused. " + describeError(result) : "");
    return false;
  }
  if (!result.ok) {
    setStatus("Could not read the served models: " + describeError(result), true);
    return false;
  }
  $("key-panel").hidden = true;
  $("key-input").value = "";
  state.models = result.body.models;
  if (state.models.length === 0) {
    setStatus("The service serves no models: put one in its repository (NAME/VERSION/model.onnx).", true);
    $("workspace").hidden = true;
    return false;
  }
  setStatus("");
  $("workspace").hidden = false;
  fillModelPicker();
  return true;
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.hidden = !text;
  status.classList.toggle("error", isError);
}

function modelNames() {
  return [...new Set(state.models.map((m) => m.name))].sort();
}

function versionsOf(name) {
  return state.models.filter((m) => m.name === name).sort((a, b) => b.version - a.version);
}

// What a request without `version` gets: the highest ready version, as the service decides.
function servedVersion(name, version) {
  const versions = versionsOf(name);
  if (version) return versions.find((m) => m.version === version);
  return versions.find((m) => m.state === "ready") || versions[0];
}

function fillModelPicker() {
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...modelNames().map((name) => new Option(name, name)));
  if (modelNames().includes(previous)) select.value = previous;
  fillVersionPicker();
}

function fillVersionPicker() {
  const select = $("version");
  const previous = select.value;
  const options = [new Option("latest ready", "")];
  for (const m of versionsOf($("model").value)) {
    options.push(new Option(m.state === "ready" ? String(m.version) : m.version + " (" + m.state + ")", String(m.version)));
  }
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  selectionChanged();
}

function selection() {
  const name = $("model").value;
  const version = $("version").value ? Number($("version").value) : null;
  const topK = Math.max(1, Math.floor(Number($("top-k").value) || 5));
  return { name, version, topK, info: servedVersion(name, version) };
}

function selectionChanged() {
  const { name, version, topK, info } = selection();
  renderCard(info);
  if (info && info.labels) $("top-k").max = String(info.labels.length);
  const asked = [name, version, topK, info && info.version].join("|");
  if (asked === state.asked) return;
  state.asked = asked;
  // The same images, asked of the newly chosen model.
  for (const item of state.items) classify(item);
}

// ---- the model card ---------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function pretty(key) {
  return key.replace(/^test_/, "").replace(/_/g, " ");
}

function formatMetric(key, value) {
  if (typeof value !== "number") return String(value);
  if (!/loss/.test(key) && value >= 0 && value <= 1) return (value * 100).toFixed(2) + " %";
  return Math.abs(value) < 1e-3 && value !== 0 ? value.toExponential(1) : String(Number(value.toPrecision(4)));
}

function formatParity(key, value) {
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value !== "number") return String(value);
  if (key === "top1_agreement") return (value * 100).toFixed(2) + " %";
  if (Number.isInteger(value)) return String(value);
  return value.toExponential(1);
}

function definitionList(rows) {
  const dl = el("dl", "facts");
  for (const [term, value] of rows) {
    if (value === undefined || value === null || value === "") continue;
    dl.append(el("dt", "", term), el("dd", "", value));
  }
  return dl;
}

function table(caption, rows, className) {
  const t = el("table", className);
  t.append(el("caption", "", caption));
  const body = el("tbody");
  for (const [key, value] of rows) {
    const tr = el("tr");
    tr.append(el("th", "", key), el("td", "", value));
    body.append(tr);
  }
  t.append(body);
  return t;
}

function renderCard(info) {
  const card = $("card");
  card.replaceChildren();
  if (!info) {
    card.append(el("p", "", "No model selected."));
    return;
  }
  const title = el("h2", "", info.name + " ");
  title.id = "card-title";
  title.append(el("span", "version", "v" + info.version), el("span", "badge " + info.state, info.state));
  card.append(title);
  if (info.error) card.append(el("p", "error", info.error));

  const shape = info.input_shape;
  card.append(
    definitionList([
      ["Input", shape ? shape[0] + " × " + shape[1] + " px, " + info.color_mode + ", " + info.resize_method + " resize" : null],
      ["Runs on", info.providers && info.providers.length ? info.providers.join(", ") : null],
      ["Precision", info.precision ? info.precision + " (" + info.file + ")" : info.file],
      ["Architecture", info.architecture],
      ["Dataset", info.dataset],
    ]),
  );

  if (info.labels) {
    card.append(el("h3", "", "Labels (" + info.labels.length + ")"));
    const list = el("ul", "labels");
    for (const label of info.labels) list.append(el("li", "", label));
    card.append(list);
  }
  const metrics = Object.entries(info.metrics || {});
  if (metrics.length) {
    card.append(table("Test metrics", metrics.map(([k, v]) => [pretty(k), formatMetric(k, v)]), "metrics"));
  }
  const parity = Object.entries(info.parity || {});
  if (parity.length) {
    card.append(table("Parity: onnxruntime against Keras", parity.map(([k, v]) => [pretty(k), formatParity(k, v)]), "parity"));
  }
}

// ---- images and their results -----------------------------------------------------------

function addFiles(files) {
  const list = [...files];
  if (!list.length) return;
  // The newest images go on top, in the order they were given.
  const batch = document.createDocumentFragment();
  const added = [];
  for (const file of list) {
    const node = $("result-template").content.firstElementChild.cloneNode(true);
    const item = { file, url: URL.createObjectURL(file), el: node, run: 0 };
    const img = node.querySelector(".thumb");
    img.alt = file.name;
    img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth < 64));
    img.addEventListener("error", () => node.classList.add("no-preview"));
    img.src = item.url;
    node.querySelector(".filename").textContent = file.name || "pasted image";
    node.querySelector(".retry").addEventListener("click", () => classify(item));
    batch.append(node);
    added.push(item);
  }
  $("results").prepend(batch);
  state.items.push(...added);
  $("results-head").hidden = false;
  for (const item of added) classify(item);
}

async function classify(item) {
  const { name, version, topK } = selection();
  if (!name) return;
  const run = ++item.run; // a newer run (another model picked meanwhile) wins over this one
  const node = item.el;
  node.classList.remove("failed", "done");
  node.classList.add("pending");
  node.querySelector(".timing").textContent = "classifying…";
  node.querySelector(".error").hidden = true;
  node.querySelector(".retry").hidden = true;
  updateSummary();

  const form = new FormData();
  form.append("files", item.file, item.file.name || "pasted.png");
  const query = new URLSearchParams({ top_k: String(topK) });
  if (version) query.set("version", String(version));
  const started = performance.now();
  const result = await call("/predict/" + encodeURIComponent(name) + "?" + query, { method: "POST", body: form });
  const elapsed = performance.now() - started;
  if (run !== item.run) return;

  node.classList.remove("pending");
  const timing = node.querySelector(".timing");
  if (result.ok) {
    const answer = result.body;
    node.classList.add("done");
    node.dataset.model = answer.model;
    node.dataset.version = String(answer.version);
    timing.textContent = answer.model + " v" + answer.version + " · " + Math.round(elapsed) + " ms";
    renderBars(node, answer.predictions[0]);
  } else {
    node.classList.add("failed");
    timing.textContent = Math.round(elapsed) + " ms";
    node.querySelector(".bars").replaceChildren();
    const error = node.querySelector(".error");
    error.textContent = describeError(result);
    error.hidden = false;
    node.querySelector(".retry").hidden = false;
    if (result.status === 401) {
      sessionStorage.removeItem(KEY_STORAGE);
      askForKey("The key was refused. " + describeError(result));
    }
  }
  updateSummary();
}

function renderBars(node, prediction) {
  const rows = prediction.top_k.map((score, i) => {
    const row = el("li", i === 0 ? "bar top" : "bar");
    row.dataset.label = score.label;
    row.dataset.probability = String(score.probability);
    const percent = (score.probability * 100).toFixed(1) + " %";
    const track = el("span", "track");
    const fill = el("span", "fill");
    // CSSOM, not a style attribute: the Content-Security-Policy allows no inline styles.
    fill.style.width = Math.max(0, Math.min(100, score.probability * 100)) + "%";
    track.append(fill);
    track.setAttribute("aria-hidden", "true");
    row.append(el("span", "label", score.label), track, el("span", "percent", percent));
    return row;
  });
  node.querySelector(".bars").replaceChildren(...rows);
}

function updateSummary() {
  const count = (cls) => state.items.filter((i) => i.el.classList.contains(cls)).length;
  const parts = [state.items.length + (state.items.length === 1 ? " image" : " images")];
  if (count("pending")) parts.push(count("pending") + " waiting");
  if (count("failed")) parts.push(count("failed") + " failed");
  $("summary").textContent = parts.join(" · ");
}

function clearResults() {
  for (const item of state.items) URL.revokeObjectURL(item.url);
  state.items = [];
  $("results").replaceChildren();
  $("results-head").hidden = true;
  $("choose").focus();
}

// ---- drop, choose, paste ----------------------------------------------------------------

function setupInputs() {
  const drop = $("drop");
  const input = $("files");
  $("choose").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = ""; // choosing the same file again still fires a change
  });
  // The whole window takes drops, so a file that misses the zone is not opened by the browser instead.
  let depth = 0;
  window.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    drop.classList.add("over");
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) drop.classList.remove("over");
  });
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    drop.classList.remove("over");
    if (event.dataTransfer) addFiles(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData ? [...event.clipboardData.files] : [];
    if (!files.length) return;
    event.preventDefault();
    addFiles(files);
  });
  $("model").addEventListener("change", fillVersionPicker);
  $("version").addEventListener("change", selectionChanged);
  $("top-k").addEventListener("change", selectionChanged);
  $("reload").addEventListener("click", loadModels);
  $("clear").addEventListener("click", clearResults);
}

setupKeyForm();
setupInputs();
loadModels();
