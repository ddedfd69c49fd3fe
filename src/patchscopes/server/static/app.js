// Patchscopes explorer page: plain browser JavaScript, no build step.
// State lives in the URL query, so a view can be shared; results stream as NDJSON from /api/inspect/stream.
"use strict";

const $ = (id) => document.getElementById(id);
const FIELDS = {
  model: "model", target_model: "target-model", prompt: "prompt", preset: "preset", target_prompt: "target-prompt",
  placeholder: "placeholder", source_layers: "source-layers", target_layers: "target-layers",
  max_new_tokens: "max-new-tokens", answer: "answer", value: "heat-value",
};
const state = { info: null, position: -1, tokens: [], rows: [], plan: null, resultId: null, controller: null };

const MAX_TRIES = 3;  // a busy server (429) is asked again after its Retry-After, this many times in all

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); reject(new DOMException("aborted", "AbortError")); });
  });
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function setStatus(text) { $("status").textContent = text; }

async function apiError(response) {
  try {
    const body = await response.json();
    return `${body.error || response.status}: ${body.message || JSON.stringify(body)}`;
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

// ---- URL state ------------------------------------------------------------------------------------------
function readUrl() {
  const params = new URLSearchParams(location.search);
  for (const [key, id] of Object.entries(FIELDS)) {
    if (params.has(key)) $(id).value = params.get(key);
  }
  if (params.has("position")) {
    const position = parseInt(params.get("position"), 10);
    state.position = Number.isNaN(position) ? -1 : position;
  }
  return params.get("run") === "1";
}

function writeUrl(ran) {
  const params = new URLSearchParams();
  for (const [key, id] of Object.entries(FIELDS)) {
    const value = $(id).value;
    if (value !== "") params.set(key, value);
  }
  params.set("position", String(state.position));
  if (ran) params.set("run", "1");
  history.replaceState(null, "", `${location.pathname}?${params.toString()}`);
}

// ---- models and presets ---------------------------------------------------------------------------------
async function loadInfo() {
  const response = await fetch("/api/models");
  if (!response.ok) throw new Error(await apiError(response));
  state.info = await response.json();
  const names = state.info.models.map((m) => m.name);
  $("model").innerHTML = names.map((n) => `<option>${escapeHtml(n)}</option>`).join("");
  $("server-state").textContent = `models: ${names.join(", ")}`;
  $("max-new-tokens").max = state.info.limits.max_new_tokens;
}

function fillTargets() {
  const source = $("model").value;
  const targets = [source].concat(state.info.maps.filter((m) => m.source === source).map((m) => m.target));
  const current = $("target-model").value;
  $("target-model").innerHTML = [...new Set(targets)].map((n) => `<option>${escapeHtml(n)}</option>`).join("");
  if (targets.includes(current)) $("target-model").value = current;
}

function presetChanged(user) {
  const preset = $("preset").value;
  const info = state.info.presets[preset];
  const editable = preset === "attribute" || preset === "custom";
  $("target-prompt-box").hidden = !editable && preset !== "token-identity" && preset !== "entity-description";
  $("target-prompt").readOnly = !editable;
  if (user || !$("target-prompt").value || !editable) $("target-prompt").value = info.target_prompt || "";
  if (user || !editable) $("placeholder").value = info.placeholder || "x";
  $("placeholder").readOnly = !editable;
  if (preset === "logit-lens") $("target-prompt-box").hidden = true;
}

// ---- tokens -----------------------------------------------------------------------------------------------
let tokenTimer = null;
function scheduleTokens() {
  clearTimeout(tokenTimer);
  tokenTimer = setTimeout(() => loadTokens(false), 250);
}

function shown(text) {
  return text.replace(/ /g, "␣").replace(/\n/g, "⏎") || "∅";
}

async function loadTokens(keepPosition) {
  const prompt = $("prompt").value;
  if (!prompt.trim()) { $("tokens").innerHTML = ""; return; }
  const response = await fetch("/api/tokenize", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: $("model").value, prompt }),
  });
  if (!response.ok) { showError(await apiError(response)); return; }
  const body = await response.json();
  state.tokens = body.tokens;
  if (!keepPosition || state.position >= state.tokens.length || state.position < -state.tokens.length) state.position = -1;
  renderTokens();
}

function renderTokens() {
  const n = state.tokens.length;
  const selected = ((state.position % n) + n) % n;
  $("tokens").innerHTML = "";
  for (const tok of state.tokens) {
    const chip = document.createElement("span");
    chip.className = "tok" + (tok.index === selected ? " selected" : "");
    chip.textContent = shown(tok.text);
    chip.dataset.index = tok.index;
    chip.title = `token ${tok.index} (id ${tok.id}), characters ${tok.start}–${tok.end}`;
    chip.addEventListener("click", () => { state.position = tok.index; renderTokens(); writeUrl(false); });
    $("tokens").appendChild(chip);
  }
}

// ---- running ------------------------------------------------------------------------------------------------
function requestBody() {
  const preset = $("preset").value;
  const body = {
    model: $("model").value, prompt: $("prompt").value, position: state.position, preset,
    source_layers: $("source-layers").value.trim() || "all", target_layers: $("target-layers").value.trim() || "same",
    max_new_tokens: parseInt($("max-new-tokens").value, 10) || 0,
  };
  if ($("target-model").value && $("target-model").value !== body.model) body.target_model = $("target-model").value;
  if (preset === "attribute" || preset === "custom") {
    body.target_prompt = $("target-prompt").value;
    body.placeholder = $("placeholder").value || "x";
  }
  if ($("answer").value) body.answer = $("answer").value;
  return body;
}

function resetResults() {
  state.rows = []; state.plan = null; state.resultId = null;
  $("results-table").querySelector("tbody").innerHTML = "";
  $("heatmap").innerHTML = "";
  $("summary").textContent = "";
  for (const id of ["export-csv", "export-png"]) { $(id).classList.add("disabled"); $(id).removeAttribute("href"); }
}

async function run() {
  if (state.controller) state.controller.abort();
  showError("");
  resetResults();
  writeUrl(true);
  const controller = new AbortController();
  state.controller = controller;
  $("run").disabled = true; $("cancel").disabled = false;
  $("progress").value = 0;
  setStatus("sending…");
  try {
    let response;
    for (let attempt = 1; ; attempt++) {
      response = await fetch("/api/inspect/stream", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(requestBody()), signal: controller.signal,
      });
      if (response.status !== 429) break;
      const wait = Math.min(60, parseInt(response.headers.get("Retry-After") || "2", 10) || 2);
      if (attempt >= MAX_TRIES) throw new Error(`${await apiError(response)} (tried ${attempt} times)`);
      setStatus(`server busy: trying again in ${wait} s (attempt ${attempt + 1} of ${MAX_TRIES})`);
      await sleep(wait * 1000, controller.signal);
    }
    if (!response.ok) throw new Error(await apiError(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (line) handleEvent(JSON.parse(line));
      }
    }
  } catch (err) {
    if (err.name === "AbortError") setStatus("cancelled");
    else { showError(String(err.message || err)); setStatus("failed"); }
  } finally {
    if (state.controller === controller) state.controller = null;
    $("run").disabled = false; $("cancel").disabled = true;
  }
}

function handleEvent(event) {
  if (event.type === "queued") {
    state.plan = event.plan;
    $("progress").max = event.plan.cells;
    setStatus(`queued as ${event.job} (${event.queue.active} job(s) on the server)`);
    $("summary").textContent = `${event.plan.model} → ${event.plan.target_model}, token ${JSON.stringify(event.plan.source_token)}` +
      ` at position ${event.plan.position}, ${event.plan.preset}, ${event.plan.cells} cell(s)`;
  } else if (event.type === "started") {
    setStatus(`running 0 / ${event.total}`);
  } else if (event.type === "rows") {
    state.rows.push(...event.rows);
    $("progress").value = event.done;
    setStatus(`running ${event.done} / ${event.total}`);
    renderTable();
    renderHeatmap();
  } else if (event.type === "done") {
    state.resultId = event.result_id;
    setStatus(`done: ${event.rows} cell(s) in ${event.elapsed_s.toFixed(1)} s`);
    $("export-csv").href = `/api/results/${event.result_id}/csv`;
    $("export-png").href = `/api/results/${event.result_id}/png?value=${$("heat-value").value}`;
    for (const id of ["export-csv", "export-png"]) $(id).classList.remove("disabled");
  } else if (event.type === "error") {
    showError(`${event.error}: ${event.message}`);
    setStatus("failed");
  }
}

// ---- table and heatmap ---------------------------------------------------------------------------------------
function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function fmt(p) { return p === null || p === undefined ? "" : p.toFixed(3); }

function renderTable() {
  const rows = [...state.rows].sort((a, b) => a.source_layer - b.source_layer || a.target_layer - b.target_layer);
  $("results-table").querySelector("tbody").innerHTML = rows.map((r) => `<tr data-source="${r.source_layer}" data-target="${r.target_layer}">` +
    `<td class="num">${r.source_layer}</td><td class="num">${r.target_layer}</td>` +
    `<td class="mono decoded">${escapeHtml(r.summary)}</td><td class="mono">${escapeHtml(shown(r.top1))}</td>` +
    `<td class="num">${fmt(r.top1_prob)}</td><td class="num">${fmt(r.answer_prob)}</td>` +
    `<td class="mono">${escapeHtml(r.top_tokens.map((t, i) => `${shown(t)} ${fmt(r.top_probs[i])}`).join("  "))}</td></tr>`).join("");
}

const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function colour(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "#ccc";
  const x = Math.max(0, Math.min(1, v)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const t = x - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + (VIRIDIS[i + 1][k] - a) * t));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function renderHeatmap() {
  const svg = $("heatmap");
  const value = $("heat-value").value;
  const sources = [...new Set(state.rows.map((r) => r.source_layer))].sort((a, b) => a - b);
  const targets = [...new Set(state.rows.map((r) => r.target_layer))].sort((a, b) => b - a);
  const cell = Math.max(12, Math.min(40, Math.floor(640 / Math.max(sources.length, 1))));
  const left = 40, top = 10, bottom = 40;
  const width = left + cell * sources.length + 70, height = top + cell * targets.length + bottom;
  const ns = "http://www.w3.org/2000/svg";
  svg.innerHTML = "";
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  const byKey = new Map(state.rows.map((r) => [`${r.source_layer}:${r.target_layer}`, r]));
  targets.forEach((t, yi) => {
    sources.forEach((s, xi) => {
      const row = byKey.get(`${s}:${t}`);
      if (!row) return;
      const rect = document.createElementNS(ns, "rect");
      rect.setAttribute("x", left + xi * cell); rect.setAttribute("y", top + yi * cell);
      rect.setAttribute("width", cell); rect.setAttribute("height", cell);
      rect.setAttribute("class", "cell");
      rect.setAttribute("fill", colour(row[value]));
      rect.dataset.source = s; rect.dataset.target = t; rect.dataset.value = row[value] ?? "";
      rect.addEventListener("mousemove", (e) => showTip(e, row));
      rect.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
      svg.appendChild(rect);
    });
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", left - 4); label.setAttribute("y", top + yi * cell + cell / 2 + 3);
    label.setAttribute("text-anchor", "end"); label.textContent = t;
    svg.appendChild(label);
  });
  sources.forEach((s, xi) => {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", left + xi * cell + cell / 2); label.setAttribute("y", top + cell * targets.length + 12);
    label.setAttribute("text-anchor", "middle"); label.textContent = s;
    svg.appendChild(label);
  });
  const axis = (text, x, y, rotate) => {
    const el = document.createElementNS(ns, "text");
    el.setAttribute("x", x); el.setAttribute("y", y); el.setAttribute("text-anchor", "middle");
    if (rotate) el.setAttribute("transform", `rotate(-90 ${x} ${y})`);
    el.textContent = text; svg.appendChild(el);
  };
  axis("source layer ℓ", left + (cell * sources.length) / 2, top + cell * targets.length + 30, false);
  axis("target layer ℓ*", 10, top + (cell * targets.length) / 2, true);
  // colour scale 0..1
  const sx = left + cell * sources.length + 20;
  for (let i = 0; i < 20; i++) {
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", sx); r.setAttribute("y", top + (19 - i) * 5); r.setAttribute("width", 10); r.setAttribute("height", 5);
    r.setAttribute("fill", colour(i / 19)); svg.appendChild(r);
  }
  axis("1", sx + 22, top + 6, false); axis("0", sx + 22, top + 100, false);
}

function showTip(event, row) {
  const tip = $("tooltip");
  const tops = row.top_tokens.map((t, i) => `  ${JSON.stringify(t)} ${fmt(row.top_probs[i])}`).join("\n");
  tip.textContent = `ℓ = ${row.source_layer}, ℓ* = ${row.target_layer}\ndecoded: ${row.summary}\n` +
    (row.answer_prob !== undefined ? `p(answer) = ${fmt(row.answer_prob)}\n` : "") + `top tokens:\n${tops}`;
  tip.style.left = `${event.clientX + 14}px`; tip.style.top = `${event.clientY + 14}px`;
  tip.hidden = false;
}

// ---- wiring -------------------------------------------------------------------------------------------------------
async function init() {
  try {
    await loadInfo();
  } catch (err) {
    showError(`cannot reach the server: ${err.message || err}`);
    return;
  }
  const params = new URLSearchParams(location.search);
  const autorun = readUrl();
  if (!state.info.models.some((m) => m.name === $("model").value)) $("model").value = state.info.models[0].name;
  fillTargets();
  if (params.has("target_model")) $("target-model").value = params.get("target_model");
  presetChanged(!params.has("target_prompt") && !params.has("preset"));
  if (params.has("target_prompt")) $("target-prompt").value = params.get("target_prompt");
  await loadTokens(true);
  $("model").addEventListener("change", () => { fillTargets(); loadTokens(false); writeUrl(false); });
  $("prompt").addEventListener("input", () => { scheduleTokens(); writeUrl(false); });
  $("preset").addEventListener("change", () => { presetChanged(true); writeUrl(false); });
  for (const id of ["target-model", "target-prompt", "placeholder", "source-layers", "target-layers", "max-new-tokens", "answer"]) {
    $(id).addEventListener("change", () => writeUrl(false));
  }
  $("heat-value").addEventListener("change", () => {
    renderHeatmap(); writeUrl(state.resultId !== null);
    if (state.resultId) $("export-png").href = `/api/results/${state.resultId}/png?value=${$("heat-value").value}`;
  });
  $("grid-toggle").addEventListener("click", () => {
    $("target-layers").value = $("target-layers").value.trim() === "same" ? $("source-layers").value : "same";
    writeUrl(false);
  });
  $("run").addEventListener("click", run);
  $("cancel").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("share").addEventListener("click", async () => {
    writeUrl(true);
    try { await navigator.clipboard.writeText(location.href); setStatus("link copied"); } catch (e) { setStatus(location.href); }
  });
  document.body.dataset.ready = "1";
  if (autorun) run();
}

init();
