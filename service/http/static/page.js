// The try-it page: its option controls are built from the service's own OpenAPI document, so a
// parameter added to POST /segment shows up here without touching this file. Requests go to
// relative URLs, so the page also works behind a proxy that mounts the service under a prefix.
"use strict";

// Parameters that deserve a better control than their schema alone suggests: name → widget.
const WIDGETS = { bg_color: "color" };
// Parameters that say where the image comes from, not what to make of it: their own controls
// (url), or none, since the page sends it itself to ask again for a photo it has sent (image_id).
const SOURCES = new Set(["url", "image_id"]);

const $ = (sel, root = document) => root.querySelector(sel);
const controls = [];  // { name, value(): string | null, fallback: string | null }

function plainSchema(schema) {
  // `X | None` comes as anyOf [X, null]: the control is for X, and "unset" sends nothing.
  if (schema.anyOf) {
    const rest = schema.anyOf.filter((s) => s.type !== "null");
    if (rest.length === 1) return { ...rest[0], ...schema, anyOf: undefined, nullable: true };
  }
  return schema;
}

function field(param, id) {
  const wrap = document.createElement("div");
  wrap.className = "field";
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = param.name;
  wrap.append(label);
  if (param.description) {
    const help = document.createElement("span");
    help.className = "hint";
    help.id = `${id}-help`;
    help.textContent = param.description;
    wrap.append(help);
  }
  return wrap;
}

function describedBy(el, param, id) {
  if (param.description) el.setAttribute("aria-describedby", `${id}-help`);
  return el;
}

function buildControl(param) {
  const schema = plainSchema(param.schema || {});
  const id = `opt-${param.name}`;
  const wrap = field(param, id);
  const fallback = schema.default === undefined || schema.default === null
    ? null : String(schema.default);
  let value;
  const widget = WIDGETS[param.name];

  if (schema.enum) {
    const select = describedBy(document.createElement("select"), param, id);
    select.id = id;
    select.name = param.name;
    if (schema.nullable) select.append(new Option("(none)", ""));
    for (const v of schema.enum) select.append(new Option(String(v), String(v)));
    select.value = fallback ?? "";
    wrap.append(select);
    value = () => select.value || null;
  } else if (schema.type === "boolean") {
    const box = describedBy(document.createElement("input"), param, id);
    box.type = "checkbox";
    box.id = id;
    box.name = param.name;
    box.checked = fallback === "true";
    wrap.insertBefore(box, wrap.firstChild.nextSibling);
    value = () => String(box.checked);
  } else if (widget === "color") {
    // A colour, or nothing: the checkbox says whether to send it.
    const row = document.createElement("div");
    row.className = "row";
    const use = document.createElement("input");
    use.type = "checkbox";
    use.id = `${id}-use`;
    use.checked = fallback !== null;
    const useLabel = document.createElement("label");
    useLabel.htmlFor = use.id;
    useLabel.textContent = "use";
    const pick = describedBy(document.createElement("input"), param, id);
    pick.type = "color";
    pick.id = id;
    pick.name = param.name;
    pick.value = /^#[0-9a-f]{6}$/i.test(fallback ?? "") ? fallback : "#ffffff";
    pick.addEventListener("input", () => { use.checked = true; });
    row.append(pick, use, useLabel);
    wrap.append(row);
    value = () => (use.checked ? pick.value : null);
  } else if (schema.type === "number" || schema.type === "integer") {
    const row = document.createElement("div");
    row.className = "row";
    const num = describedBy(document.createElement("input"), param, id);
    num.type = "number";
    num.id = id;
    num.name = param.name;
    const step = schema.type === "integer" ? "1" : "any";
    num.step = step;
    if (schema.minimum !== undefined) num.min = schema.minimum;
    if (schema.maximum !== undefined) num.max = schema.maximum;
    num.value = fallback ?? "";
    if (schema.minimum !== undefined && schema.maximum !== undefined) {
      // A slider beside the number, for bounded values like the threshold.
      const range = document.createElement("input");
      range.type = "range";
      range.min = schema.minimum;
      range.max = schema.maximum;
      range.step = schema.type === "integer" ? "1" : String((schema.maximum - schema.minimum) / 100);
      range.value = num.value;
      range.setAttribute("aria-label", `${param.name} slider`);
      range.addEventListener("input", () => { num.value = range.value; });
      num.addEventListener("input", () => { range.value = num.value; });
      row.append(range);
    }
    row.append(num);
    wrap.append(row);
    value = () => (num.value === "" ? null : num.value);
  } else {
    const text = describedBy(document.createElement("input"), param, id);
    text.type = "text";
    text.id = id;
    text.name = param.name;
    text.value = fallback ?? "";
    wrap.append(text);
    value = () => (text.value.trim() === "" ? null : text.value.trim());
  }
  controls.push({ name: param.name, value, fallback });
  return wrap;
}

async function loadOptions() {
  const status = $("#options-status");
  try {
    const r = await fetch("openapi.json");
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const spec = await r.json();
    const op = spec.paths["/segment"].post;
    const params = (op.parameters || []).filter((p) => p.in === "query");
    for (const p of params) {
      if (!SOURCES.has(p.name)) $("#options").append(buildControl(p));
    }
    // The URL field only where the service fetches images by URL.
    $("#by-url").hidden = !params.some((p) => p.name === "url");
    status.remove();
  } catch (err) {
    status.textContent = `Could not read the options (${err.message}); the defaults apply.`;
  }
}

function query() {
  const q = new URLSearchParams();
  for (const c of controls) {
    const v = c.value();
    if (v !== null && v !== c.fallback) q.set(c.name, v);
  }
  return q;
}

// "upload;dur=0.4, infer;dur=231.0;desc=\"batch of 1\"" → "upload 0.4 ms · infer 231 ms (batch of 1)"
function timings(header) {
  if (!header) return "";
  return header.split(",").map((entry) => {
    const [name, ...attrs] = entry.trim().split(";");
    let dur = "";
    let desc = "";
    for (const a of attrs) {
      const [k, v = ""] = a.split("=");
      if (k.trim() === "dur") dur = `${Number(v).toFixed(Number(v) < 10 ? 1 : 0)} ms`;
      if (k.trim() === "desc") desc = ` (${v.replace(/^"|"$/g, "")})`;
    }
    return `${name} ${dur}${desc}`.trim();
  }).join(" · ");
}

const EXTENSIONS = { "image/png": ".png", "image/webp": ".webp", "image/jpeg": ".jpg",
  "application/json": ".json" };

function outputName(name, type) {
  const stem = name.replace(/\.[^.]*$/, "") || "image";
  return stem + (EXTENSIONS[type.split(";")[0]] || "");
}

async function errorMessage(r) {
  try {
    const body = await r.json();
    if (body && body.error) return `${body.error.code}: ${body.error.message}`;
  } catch (_) { /* not our JSON body: fall through */ }
  return `HTTP ${r.status} ${r.statusText}`;
}

// The last part of a URL's path, as a name for its result ("image" when there is none).
function urlName(url) {
  try {
    return decodeURIComponent(new URL(url).pathname.split("/").pop()) || "image";
  } catch (_) {
    return "image";
  }
}

// The photos shown, newest first: { source, name, card, checker }, where `source` is a File or
// { url } for an image the service fetches itself; each card keeps its photo's id (X-Image-Id)
// in data-image-id. Changing an option re-renders them from their ids: the service keeps each
// upload (and each URL's bytes) and its map, so the photo is neither sent nor fetched again and
// the network does not run.
let shown = [];

function newItem(source) {
  const card = $("#result-template").content.firstElementChild.cloneNode(true);
  const byUrl = !(source instanceof Blob);
  const name = byUrl ? urlName(source.url) : source.name;
  $(".name", card).textContent = byUrl ? source.url : name;
  const original = $(".original", card);
  if (byUrl) {
    // Not loaded here: the page fetches nothing from elsewhere (and its policy forbids it).
    original.closest("figure").hidden = true;
  } else {
    original.onerror = () => { original.closest("figure").hidden = true; };  // not a picture
    original.src = URL.createObjectURL(source);
    original.alt = `${name}, as picked`;
  }
  return { source, name, card, checker: $(".checker", card) };
}

async function send(item, q, key) {
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const id = item.card.dataset.imageId;
  if (id) {
    // Only the id and the options: an empty body, a few hundred bytes in all.
    const again = new URLSearchParams(q);
    again.set("image_id", id);
    const r = await fetch(`segment?${again}`, { method: "POST", headers });
    // The service no longer has it (expired, evicted, restarted): send it after all.
    if (r.status !== 404 && r.status !== 410) return r;
    delete item.card.dataset.imageId;
  }
  let body;
  if (item.source instanceof Blob) {
    body = new FormData();
    body.append("image", item.source, item.name);
  } else {
    body = new URLSearchParams({ url: item.source.url });  // sent form-encoded
  }
  return fetch(`segment?${q}`, { method: "POST", body, headers });
}

async function segmentOne(item, q, key) {
  const { card, name } = item;
  card.dataset.state = "pending";
  const error = $(".error", card);
  error.hidden = true;
  const fail = (message) => {
    card.dataset.state = "error";
    error.textContent = message;
    error.hidden = false;
  };
  let r;
  try {
    r = await send(item, q, key);
  } catch (err) {
    fail(`the service could not be reached (${err.message})`);
    return false;
  }
  $(".timing", card).textContent = timings(r.headers.get("Server-Timing"));
  if (!r.ok) {
    fail(await errorMessage(r));
    if (r.status === 401) {
      $("#auth").open = true;
      $("#api-key").focus();
    }
    return false;
  }
  const id = r.headers.get("X-Image-Id");
  if (id) card.dataset.imageId = id;
  else delete card.dataset.imageId;
  const blob = await r.blob();
  const url = URL.createObjectURL(blob);
  const link = $(".download", card);
  link.href = url;
  link.download = outputName(name, blob.type);
  link.textContent = `Download ${link.download}`;
  link.hidden = false;
  const old = $("pre", card);
  if (blob.type.startsWith("image/")) {
    if (old) old.replaceWith(item.checker);
    const out = $(".output", card);
    out.alt = `${name}, segmented (${q.toString() || "defaults"})`;
    await new Promise((resolve) => {
      out.onload = resolve;
      out.onerror = resolve;
      out.src = url;
    });
    $(".caption", card).textContent =
      `Result, ${out.naturalWidth}×${out.naturalHeight}, ${(blob.size / 1024).toFixed(0)} KiB`;
  } else {
    const pre = document.createElement("pre");
    pre.textContent = await blob.text();
    (old || $(".checker", card)).replaceWith(pre);
  }
  card.dataset.state = "done";
  return true;
}

// `sources`: Files, or { url } objects.
async function run(sources) {
  if (!sources.length) return;
  const items = [...sources].map((source) => {
    const item = newItem(source);
    $("#results").prepend(item.card);
    return item;
  });
  shown = [...items.slice().reverse(), ...shown];
  await segmentAll(items, "Segmenting");
}

let running = null;
let again = false;

async function segmentAll(items, verb) {
  const buttons = [$("#run"), $("#run-url")];
  const status = $("#status");
  for (const b of buttons) b.disabled = true;
  const q = query();
  const key = $("#api-key").value.trim();
  let ok = 0;
  try {
    // One at a time: the service batches concurrent clients, but a page should not flood it.
    for (const [i, item] of items.entries()) {
      const label = item.source instanceof Blob ? item.name : item.source.url;
      status.textContent = `${verb} ${label} (${i + 1} of ${items.length})…`;
      if (await segmentOne(item, q, key)) ok += 1;
    }
    status.textContent = `${ok} of ${items.length} done.`;
  } finally {
    for (const b of buttons) b.disabled = false;
  }
}

// An option changed: show every photo again with the new options, from their ids. Changes made
// while that runs are taken up by one more pass at its end.
async function rerender() {
  if (running) {
    again = true;
    return;
  }
  const items = shown.filter((item) => item.card.isConnected);
  if (!items.length) return;
  running = segmentAll(items, "Updating");
  try {
    await running;
  } finally {
    running = null;
  }
  if (again) {
    again = false;
    await rerender();
  }
}

function init() {
  const input = $("#files");
  const drop = $("#drop");
  $("#form").addEventListener("submit", (e) => {
    e.preventDefault();
    run(input.files);
  });
  input.addEventListener("change", () => run(input.files));
  const url = $("#image-url");
  const byUrl = () => { if (url.value.trim()) run([{ url: url.value.trim() }]); };
  $("#run-url").addEventListener("click", byUrl);
  url.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();  // not the form's submit, which segments the picked files
      byUrl();
    }
  });
  // Any option's change (a select, a box, a colour, a number once typed or a slider let go).
  $("#options").addEventListener("change", () => rerender());
  // Dropping anywhere on the page works; the drop zone only shows where.
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", (e) => {
    if (e.target === document.documentElement || !e.relatedTarget) drop.classList.remove("over");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    // Whatever is dropped is sent: the service says what it cannot read.
    run([...e.dataTransfer.files]);
  });
  loadOptions();
}

init();
