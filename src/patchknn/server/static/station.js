// patchknn inspection station: plain JavaScript on the server's JSON API (no framework, no CDN).
// The API key lives in sessionStorage (this tab only) and goes in the Authorization header only.
"use strict";

const KEY_ITEM = "patchknn-api-key";
const state = { models: [], roles: [], shots: [], lastResult: 0, seen: new Set(), follow: null };
const $ = (sel, root = document) => root.querySelector(sel);

function key() { return sessionStorage.getItem(KEY_ITEM) || ""; }

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (key()) headers.set("Authorization", "Bearer " + key());
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.blob();
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    const err = new Error(message);
    err.status = response.status;
    throw err;
  }
  return body;
}

function text(el, value) { el.textContent = value === null || value === undefined ? "-" : String(value); }
function fmt(x, digits = 6) { return typeof x === "number" ? x.toPrecision(digits) : "-"; }
function isAdmin() { return state.roles.includes("admin"); }
function currentModel() { return $("#model").value; }

// ----------------------------------------------------------------------------------- login
async function login(event) {
  if (event) event.preventDefault();
  const typed = $("#key").value.trim();
  if (typed) sessionStorage.setItem(KEY_ITEM, typed);
  $("#key").value = "";
  text($("#login-error"), "");
  try {
    const session = await api("/v1/session");
    state.roles = session.roles;
    await loadModels();
  } catch (err) {
    sessionStorage.removeItem(KEY_ITEM);
    $("#login-error").textContent = err.status === 401 ? "This key is not accepted: " + err.message : err.message;
    showMain(false);
    return;
  }
  showMain(true);
  text($("#who"), "role: " + (isAdmin() ? "admin" : "predict"));
  $("#teach").hidden = !isAdmin();
  await loadWatchFolders();
  pollResults();
}

function logout() {
  sessionStorage.removeItem(KEY_ITEM);
  state.roles = [];
  showMain(false);
}

function showMain(on) {
  $("#main").hidden = !on;
  $("#login").hidden = on;
  $("#logout").hidden = !on;
  if (!on) text($("#who"), "");
}

// ----------------------------------------------------------------------------------- models
async function loadModels() {
  const answer = await api("/v1/models");
  state.models = answer.models;
  const select = $("#model");
  const chosen = select.value;
  select.replaceChildren();
  const filter = $("#filter-model");
  const filterChosen = filter.value;
  filter.replaceChildren(new Option("all", ""));
  for (const m of state.models) {
    select.append(new Option(m.name, m.name));
    filter.append(new Option(m.name, m.name));
  }
  if (chosen && state.models.some((m) => m.name === chosen)) select.value = chosen;
  filter.value = filterChosen;
  await showCard();
}

function row(table, label, value) {
  const tr = document.createElement("tr");
  const th = document.createElement("th");
  const td = document.createElement("td");
  th.textContent = label;
  if (value instanceof Node) td.append(value); else text(td, value);
  tr.append(th, td);
  table.append(tr);
  return td;
}

async function showCard() {
  const name = currentModel();
  const card = $("#card");
  card.replaceChildren();
  if (!name) return;
  const m = await api("/v1/models/" + encodeURIComponent(name));
  const info = m.fit_info || {};
  const cal = info.calibration || {};
  const table = document.createElement("table");
  const version = document.createElement("span");
  version.className = "version-number";
  text(version, m.version_number === null ? "unversioned" : m.version_number);
  row(table, "version", version);
  row(table, "fingerprint", m.version).className = "fingerprint";
  row(table, "backbone", m.backbone);
  row(table, "input size", m.image_size + " px");
  const c = m.config;
  row(table, "method", (c.layers || []).join("+") + ", grid " + c.grid_size + "x" + c.grid_size + ", PCA " +
    c.pca_variance + ", k=" + c.k + ", " + c.index + (c.coreset_ratio < 1 ? ", coreset " + c.coreset_ratio : ""));
  row(table, "training images", info.n_train_images);
  row(table, "memory bank", info.bank_size === undefined ? "-" : info.bank_size + " patches");
  row(table, "threshold", fmt(m.threshold));
  row(table, "calibration", cal.method ? cal.method + " on " + cal.n_images + " held-out images" : "none");
  if (cal.image) {
    const q = cal.image;
    row(table, "held-out scores", ["min", "q50", "q99", "max"].filter((k) => k in q)
      .map((k) => k + " " + fmt(q[k], 4)).join(", "));
  }
  card.append(table);
  if (m.correctable) {
    const history = await api("/v1/models/" + encodeURIComponent(name) + "/versions");
    const list = document.createElement("ol");
    list.className = "versions";
    for (const v of history.versions.slice(0, 8)) {
      const li = document.createElement("li");
      li.value = v.number;
      const added = v.n_added ? ", +" + v.n_added + " normal image(s)" : "";
      text(li, "v" + v.number + (v.number === history.serving ? " (served)" : "") + ": " +
        (v.created || "") + added + (v.author ? " by " + v.author : "") + (v.note ? ", " + v.note : ""));
      if (isAdmin() && v.number !== history.serving) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "small serve-version";
        button.textContent = "serve v" + v.number;
        button.addEventListener("click", () => serveVersion(name, v.number));
        li.append(" ", button);
      }
      list.append(li);
    }
    const h = document.createElement("h3");
    h.textContent = "Versions";
    card.append(h, list);
  }
}

// ----------------------------------------------------------------------------------- scoring
async function scoreFile(file, name) {
  const model = currentModel();
  const node = $("#shot-template").content.firstElementChild.cloneNode(true);
  text($(".name", node), name);
  text($(".verdict", node), "...");
  $("#shots").prepend(node);
  const shot = { file, name, model, node };
  try {
    const form = new FormData();
    form.append("file", file, name);
    const url = "/v1/models/" + encodeURIComponent(model) + "/predict?map=overlay&source=" + encodeURIComponent(name);
    const r = await api(url, { method: "POST", body: form });
    shot.result = r;
    node.dataset.score = String(r.score);
    node.dataset.verdict = r.verdict || "";
    node.dataset.version = String(r.version_number === null ? r.model_version : r.version_number);
    const verdict = $(".verdict", node);
    text(verdict, r.verdict || "no threshold");
    verdict.className = "verdict " + (r.verdict || "none");
    text($(".score", node), fmt(r.score));
    text($(".threshold", node), fmt(r.threshold));
    text($(".shot-model", node), r.model);
    text($(".shot-version", node), r.version_number === null ? r.model_version : r.version_number);
    text($(".timing", node), r.timing_ms.total.toFixed(0));
    const m = r.anomaly_map;
    text($(".scale", node), fmt(m.vmin, 3) + " to " + fmt(m.vmax, 3));
    $(".overlay", node).src = "data:" + m.media_type + ";base64," + m.data;
    const mark = $(".admin-only", node);
    mark.hidden = !isAdmin();
    $(".mark-normal", node).addEventListener("change", updateCorrectButton);
    state.shots.push(shot);
  } catch (err) {
    node.classList.add("failed");
    text($(".verdict", node), "error");
    text($(".error", node), err.message);
  }
  return shot;
}

async function scoreMany(items) {
  // a few requests at once: the server batches them into one backbone call
  const queue = [...items];
  let done = 0;
  const total = queue.length;
  text($("#busy"), "scoring " + total + " image(s)...");
  async function worker() {
    while (queue.length) {
      const { file, name } = queue.shift();
      await scoreFile(file, name);
      done += 1;
      text($("#busy"), done < total ? "scored " + done + " of " + total : "scored " + total + " image(s)");
    }
  }
  await Promise.all([worker(), worker(), worker()]);
}

function onFiles(fileList) {
  const items = Array.from(fileList).filter((f) => f.type.startsWith("image/") || f.type === "")
    .map((file) => ({ file, name: file.name }));
  if (items.length) scoreMany(items);
}

// ----------------------------------------------------------------------------------- camera folders
async function loadWatchFolders() {
  const answer = await api("/v1/watch");
  const select = $("#watch");
  select.replaceChildren(...answer.folders.map((f) => new Option(f, f)));
  $("#watch-box").hidden = answer.folders.length === 0;
}

async function scoreWatch(onlyNew) {
  const folder = $("#watch").value;
  if (!folder) return;
  const n = Math.max(1, Math.min(100, Number($("#watch-n").value) || 5));
  const listing = await api("/v1/watch/" + encodeURIComponent(folder) + "?limit=" + n);
  const items = [];
  for (const img of listing.images.slice().reverse()) {
    const id = folder + "/" + img.name + "@" + img.mtime;
    if (onlyNew && state.seen.has(id)) continue;
    state.seen.add(id);
    const blob = await api("/v1/watch/" + encodeURIComponent(folder) + "/" + encodeURIComponent(img.name));
    items.push({ file: blob, name: folder + "/" + img.name });
  }
  if (items.length) await scoreMany(items);
}

function toggleFollow() {
  if (state.follow) clearInterval(state.follow);
  state.follow = null;
  if ($("#watch-follow").checked) {
    scoreWatch(true);
    state.follow = setInterval(() => scoreWatch(true).catch(() => {}), 3000);
  }
}

// ----------------------------------------------------------------------------------- corrections
function selectedShots() {
  return state.shots.filter((s) => s.result && s.model === currentModel() && $(".mark-normal", s.node).checked);
}

function updateCorrectButton() {
  const n = selectedShots().length + $("#extra-normal").files.length;
  const button = $("#correct-btn");
  button.disabled = n === 0;
  button.textContent = "Mark as normal: " + n + " selected";
}

async function correct() {
  const model = currentModel();
  const shots = selectedShots();
  const form = new FormData();
  for (const s of shots) form.append("file", s.file, s.name);
  for (const f of $("#extra-normal").files) form.append("file", f, f.name);
  if ($("#note").value.trim()) form.append("note", $("#note").value.trim());
  const status = $("#correct-status");
  status.className = "";
  text(status, "teaching " + model + "... (the current version keeps answering meanwhile)");
  $("#correct-btn").disabled = true;
  try {
    const r = await api("/v1/models/" + encodeURIComponent(model) + "/corrections", { method: "POST", body: form });
    text(status, "model " + model + ": version " + r.version_number + " is now served (was " +
      r.previous.version_number + "); new threshold " + fmt(r.threshold));
    status.className = "ok";
    for (const s of shots) $(".mark-normal", s.node).checked = false;
    $("#extra-normal").value = "";
    $("#note").value = "";
    await loadModels();
  } catch (err) {
    status.className = "error";
    text(status, (err.status === 403 ? "not allowed: " : "correction failed: ") + err.message);
  }
  updateCorrectButton();
}

async function serveVersion(model, number) {
  const status = $("#correct-status");
  status.className = "";
  text(status, "loading version " + number + " of " + model + "...");
  try {
    const r = await api("/v1/models/" + encodeURIComponent(model) + "/rollback?version=" + number, { method: "POST" });
    text(status, "model " + model + ": version " + r.version_number + " is now served (was " +
      r.previous.version_number + ")");
    status.className = "ok";
    await loadModels();
  } catch (err) {
    status.className = "error";
    text(status, "rollback failed: " + err.message);
  }
}

// ----------------------------------------------------------------------------------- recent results
async function pollResults() {
  if ($("#main").hidden) return;
  try {
    const params = new URLSearchParams({ limit: "50" });
    if ($("#ng-only").checked) params.set("verdict", "NG");
    if ($("#filter-model").value) params.set("model", $("#filter-model").value);
    const window = $("#filter-time").value;
    if (window) params.set("since", String(Date.now() / 1000 - Number(window)));
    const answer = await api("/v1/results?" + params);
    const body = $("#recent tbody");
    body.replaceChildren();
    for (const r of answer.results) {
      const tr = document.createElement("tr");
      tr.className = r.verdict === "NG" ? "ng" : "";
      const cells = [new Date(r.time * 1000).toLocaleTimeString(), r.model,
        r.version_number === null ? r.model_version : r.version_number, r.source, fmt(r.score), fmt(r.threshold),
        r.verdict || "-", r.total_ms === null ? "-" : r.total_ms.toFixed(0)];
      for (const c of cells) { const td = document.createElement("td"); text(td, c); tr.append(td); }
      body.append(tr);
    }
  } catch (err) {
    if (err.status === 401) { logout(); return; }
  }
  clearTimeout(state.poll);
  state.poll = setTimeout(pollResults, 2000);
}

// ----------------------------------------------------------------------------------- wiring
document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  $("#model").addEventListener("change", () => { showCard(); updateCorrectButton(); });
  $("#files").addEventListener("change", (e) => { onFiles(e.target.files); e.target.value = ""; });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); onFiles(e.dataTransfer.files); });
  $("#watch-score").addEventListener("click", () => scoreWatch(false));
  $("#watch-follow").addEventListener("change", toggleFollow);
  $("#extra-normal").addEventListener("change", updateCorrectButton);
  $("#correct-btn").addEventListener("click", correct);
  for (const id of ["#ng-only", "#filter-model", "#filter-time"]) $(id).addEventListener("change", pollResults);
  if (key()) login(); else showMain(false);
});
