// The Nimbus dashboard: a page of the admin listener that reads the admin
// API with the token the user logs in with (kept for the browser tab only).
// Everything shown is set as text, never as markup: function output and
// names cannot inject anything.
"use strict";

const BUCKETS = document
  .querySelector('meta[name="nimbus-buckets"]')
  .content.split(",")
  .map(Number);
const HISTORY = 400; // samples kept per function (the node's hour, then 2 s apart)
const POLL_MS = 2000;

let token = sessionStorage.getItem("nimbus-token") || "";
let selected = null;
let tailAbort = null;
let generation = 0; // the polling loop that is current; older ones stop
const history = new Map(); // function -> [{at, counters}]
const invoked = new Map(); // invocation id -> {status, duration_ms, at}
const opened = new Set(); // invocations whose span timeline is shown

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

async function api(method, path, body) {
  const init = { method, headers: { authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (resp.status === 401) {
    logout("The token was refused: log in again.");
    throw new Error("unauthorized");
  }
  const data = await resp.json().catch(() => null);
  if (!resp.ok) throw new Error(data?.error?.message || `${resp.status}`);
  return data;
}

// ---- login ----

async function login(event) {
  event?.preventDefault();
  token = $("token").value.trim() || token;
  try {
    const status = await api("GET", "/v1/status");
    sessionStorage.setItem("nimbus-token", token);
    $("login-view").hidden = true;
    $("app").hidden = false;
    $("logout").hidden = false;
    $("node").textContent = `${status.version} · gateway ${status.gateway_url} · up ${status.uptime_secs}s`;
    generation += 1;
    refresh(generation);
  } catch (e) {
    $("login-error").textContent =
      e.message === "unauthorized" ? "That token was refused." : `Cannot reach the node: ${e.message}`;
  }
}

function logout(message = "") {
  token = "";
  sessionStorage.removeItem("nimbus-token");
  tailAbort?.abort();
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login-view").hidden = false;
  $("login-error").textContent = message;
}

// ---- measures ----

function quantile(before, after, q) {
  const total = after.duration_count - (before?.duration_count || 0);
  if (total <= 0) return null;
  const rank = Math.max(1, Math.ceil(total * q));
  let seen = 0;
  for (let i = 0; i < BUCKETS.length; i++) {
    seen += (after.duration_buckets[i] || 0) - (before?.duration_buckets[i] || 0);
    if (seen >= rank) return BUCKETS[i] * 1000;
  }
  return BUCKETS[BUCKETS.length - 1] * 1000;
}

// Per-interval measures of one function's history.
function series(samples) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const a = samples[i - 1];
    const b = samples[i];
    if (b.version !== a.version) continue;
    const dt = (b.at - a.at) / 1000 || 1;
    const inv = b.counters.invocations - a.counters.invocations;
    out.push({
      at: b.at,
      rps: inv / dt,
      errors: inv ? (b.counters.errors - a.counters.errors) / inv : 0,
      p50: quantile(a.counters, b.counters, 0.5),
      p99: quantile(a.counters, b.counters, 0.99),
      cold: (b.counters.coldstarts - a.counters.coldstarts) / dt,
    });
  }
  return out;
}

// Measures over the last minute of samples.
function summary(samples) {
  const last = samples[samples.length - 1];
  const first = samples.find((s) => s.version === last.version && s.at >= last.at - 60_000);
  const dt = (last.at - first.at) / 1000;
  const inv = last.counters.invocations - first.counters.invocations;
  return {
    rps: dt > 0 ? inv / dt : 0,
    errors: inv ? (last.counters.errors - first.counters.errors) / inv : 0,
    p50: quantile(first.counters, last.counters, 0.5),
    p99: quantile(first.counters, last.counters, 0.99),
    cold: last.counters.coldstarts - first.counters.coldstarts,
  };
}

// Draws `lines` (values at `times`, ms) on one time axis.
function chart(svg, lines, times) {
  svg.replaceChildren();
  const all = lines.flat().filter((v) => v !== null);
  const max = Math.max(1e-9, ...all);
  const first = times[0] ?? 0;
  const span = Math.max(1, (times[times.length - 1] ?? 0) - first);
  lines.forEach((values, n) => {
    const pts = values
      .map((v, i) => `${((times[i] - first) / span) * 300},${80 - ((v || 0) / max) * 76}`)
      .join(" ");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts);
    if (n > 0) line.setAttribute("class", "second");
    svg.append(line);
  });
  const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
  title.textContent = `max ${max.toFixed(2)}`;
  svg.append(title);
}

const fmt = {
  num: (v) => (v >= 100 ? v.toFixed(0) : v.toFixed(1)),
  pct: (v) => `${(v * 100).toFixed(1)}%`,
  ms: (v) => (v === null ? "–" : v < 1 ? `${(v * 1000).toFixed(0)} µs` : `${v.toFixed(1)} ms`),
  secs: (ms) => (ms < 60_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms / 60_000)} min`),
};

// ---- functions ----

function triggers(config) {
  const t = [];
  for (const s of config.sources || []) t.push(s.type);
  for (const s of config.schedules || []) t.push(`cron ${s.cron}`);
  for (const b of config.buckets || []) t.push(`bucket ${b.bucket}`);
  for (const a of config.alerts || []) t.push(`alert ${a.metric}`);
  return t.join(", ") || "–";
}

async function refresh(gen) {
  if (!token || gen !== generation) return;
  try {
    const [functions, stats, alerts] = await Promise.all([
      api("GET", "/v1/functions"),
      api("GET", "/v1/stats"),
      api("GET", "/v1/alerts"),
    ]);
    for (const s of stats) {
      const h = history.get(s.function) || [];
      h.push(s);
      while (h.length > HISTORY) h.shift();
      history.set(s.function, h);
    }
    renderFunctions(functions);
    const firing = alerts.filter((a) => a.firing);
    $("alerts").textContent = firing.length
      ? `Firing: ${firing.map((a) => `${a.function} ${a.metric} ${a.value?.toFixed(3)} > ${a.above}`).join("; ")}`
      : "";
    $("alerts").className = firing.length ? "error" : "";
    if (selected) await renderDetail();
  } catch (e) {
    if (e.message !== "unauthorized") console.warn(e);
  } finally {
    if (token && gen === generation) setTimeout(() => refresh(gen), POLL_MS);
  }
}

// Whether a function's code is in memory, and when it is kept there if
// the node learnt that from its idle times.
function memoryState(f) {
  const w = f.keep_alive;
  const learnt = !w
    ? ""
    : w.load_at_ms
      ? `, back ${fmt.secs(w.load_at_ms)}–${fmt.secs(w.unload_at_ms)} after a call`
      : `, kept ${fmt.secs(w.unload_at_ms)} after a call`;
  return el("div", { class: "state" }, (f.loaded ? "in memory" : "on disk") + learnt);
}

function renderFunctions(functions) {
  const body = $("functions").tBodies[0];
  body.replaceChildren();
  if (!functions.length) {
    body.append(el("tr", {}, el("td", { colSpan: 11, class: "empty" }, "No functions: deploy with `nimbus deploy`.")));
  }
  for (const f of functions) {
    const samples = history.get(f.name) || [];
    const s = samples.length > 1 ? summary(samples) : null;
    const spark = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    spark.setAttribute("viewBox", "0 0 300 80");
    spark.setAttribute("preserveAspectRatio", "none");
    const sparkPoints = series(samples.slice(-60));
    chart(spark, [sparkPoints.map((p) => p.rps)], sparkPoints.map((p) => p.at));
    const row = el(
      "tr",
      { "data-function": f.name, class: f.name === selected ? "selected" : "" },
      el("td", {}, el("strong", {}, f.name), f.ready ? memoryState(f) : el("div", { class: "error" }, f.error || "not loaded")),
      el("td", {}, `v${f.version}`),
      el("td", {}, f.routes.join(" ") || "–"),
      el("td", {}, triggers(f.config)),
      el("td", {}, s ? fmt.num(s.rps) : "–"),
      el("td", {}, s ? fmt.pct(s.errors) : "–"),
      el("td", {}, s ? fmt.ms(s.p50) : "–"),
      el("td", {}, s ? fmt.ms(s.p99) : "–"),
      el("td", {}, s ? s.cold : "–"),
      el("td", {}, f.in_flight),
      el("td", {}, spark),
    );
    row.addEventListener("click", () => select(f.name));
    body.append(row);
  }
}

// ---- one function ----

function select(name) {
  if (selected === name) return;
  selected = name;
  $("detail").hidden = false;
  $("detail-name").textContent = name;
  $("invoke-result").textContent = "";
  $("tail").textContent = "";
  for (const tr of $("functions").tBodies[0].rows) {
    tr.classList.toggle("selected", tr.dataset.function === name);
  }
  follow(name);
  loadHistory(name).then(renderDetail);
  renderVersions(name);
}

// The node's last hour of readings, before what this page sampled itself.
async function loadHistory(name) {
  const past = await api("GET", `/v1/functions/${encodeURIComponent(name)}/history`);
  const live = history.get(name) || [];
  const since = live.length ? live[0].at : Infinity;
  const merged = past.filter((p) => p.at < since).concat(live);
  history.set(name, merged.slice(-HISTORY));
}

async function renderVersions(name) {
  const detail = await api("GET", `/v1/functions/${encodeURIComponent(name)}`);
  if (name !== selected) return;
  $("versions").textContent = "versions: " + detail.versions
    .map((v) => `v${v.version}${v.active ? " (active)" : ""} ${new Date(v.created_at).toLocaleString()}`)
    .join(" · ");
}

async function renderDetail() {
  const name = selected;
  const points = series(history.get(name) || []);
  const times = points.map((p) => p.at);
  chart($("chart-rps"), [points.map((p) => p.rps)], times);
  chart($("chart-errors"), [points.map((p) => p.errors)], times);
  chart($("chart-latency"), [points.map((p) => p.p50), points.map((p) => p.p99)], times);
  chart($("chart-cold"), [points.map((p) => p.cold)], times);
  const q = encodeURIComponent(name);
  const [lines, queued, dlq] = await Promise.all([
    api("GET", `/v1/functions/${q}/logs?limit=500`),
    api("GET", `/v1/functions/${q}/invocations?limit=20`),
    api("GET", `/v1/functions/${q}/dlq?limit=50`),
  ]);
  if (name !== selected) return;
  renderInvocations(lines, queued);
  renderDlq(dlq);
}

// Invocations seen in the log store, those invoked from here, and queued
// ones with their attempts, newest first.
function renderInvocations(lines, queued) {
  const byId = new Map();
  const entry = (id, at) => {
    if (!byId.has(id)) byId.set(id, { id, at, lines: [] });
    const e = byId.get(id);
    e.at = Math.max(e.at, at);
    return e;
  };
  for (const l of lines) entry(l.invocation, l.at).lines.push(l);
  for (const [id, r] of invoked) if (r.function === selected) Object.assign(entry(id, r.at), { result: r });
  for (const r of queued) Object.assign(entry(r.id, r.updated_at), { queued: r });
  const list = [...byId.values()].sort((a, b) => b.at - a.at).slice(0, 30);
  const box = $("invocations");
  box.replaceChildren();
  if (!list.length) box.append(el("p", { class: "empty" }, "No invocations yet."));
  for (const e of list) {
    const head = el("header", {}, el("code", {}, e.id), el("span", {}, new Date(e.at).toLocaleTimeString()));
    if (e.result) head.append(el("span", {}, `HTTP ${e.result.status} in ${e.result.duration_ms.toFixed(1)} ms`));
    if (e.queued) {
      head.append(el("span", {}, `${e.queued.trigger} · ${e.queued.state} · ${e.queued.attempts.length} attempt(s)`));
    }
    const item = el("div", { class: "invocation", "data-id": e.id }, head);
    head.title = "show the spans";
    head.addEventListener("click", () => toggleSpans(e.id, item));
    if (e.queued?.attempts.length) item.append(timeline(e.queued.attempts));
    if (opened.has(e.id)) showSpans(e.id, item);
    if (e.lines.length) {
      item.append(el("pre", {}, e.lines.map((l) => `${l.stream === "stderr" ? "! " : ""}${l.text}`).join("\n")));
    }
    box.append(item);
  }
}

function toggleSpans(id, item) {
  if (opened.has(id)) {
    opened.delete(id);
    item.querySelector(".spans")?.remove();
  } else {
    opened.add(id);
    showSpans(id, item);
  }
}

// The invocation's spans (its own, then admission, instantiation,
// execution) on one time axis.
async function showSpans(id, item) {
  const spans = await api("GET", `/v1/invocations/${encodeURIComponent(id)}/spans`);
  item.querySelector(".spans")?.remove();
  const box = el("div", { class: "spans" });
  if (!spans.length) box.append(el("p", { class: "empty" }, "No spans kept for this invocation."));
  const start = Math.min(...spans.map((s) => s.start_ms));
  const end = Math.max(...spans.map((s) => s.start_ms + s.duration_ms));
  const total = Math.max(0.001, end - start);
  for (const s of spans) {
    const bar = el("span", { class: s.error ? "failed" : "", title: s.error || "" });
    bar.style.left = `${((s.start_ms - start) / total) * 100}%`;
    bar.style.width = `${Math.max(0.5, (s.duration_ms / total) * 100)}%`;
    box.append(
      el("div", { class: "span-row", "data-name": s.name },
        el("span", { class: "span-name" }, s.name),
        el("div", { class: "timeline" }, bar),
        el("span", { class: "span-ms" }, fmt.ms(s.duration_ms))),
    );
  }
  item.append(box);
}

// The attempts of an invocation on one time axis.
function timeline(attempts) {
  const start = attempts[0].started_at;
  const end = Math.max(...attempts.map((a) => a.started_at + a.duration_ms));
  const span = Math.max(1, end - start);
  const bar = el("div", { class: "timeline", title: "attempts over time" });
  for (const a of attempts) {
    const ok = a.status !== null && a.status < 400;
    const s = el("span", { class: ok ? "" : "failed", title: `attempt ${a.n}: ${a.status ?? a.error} in ${a.duration_ms.toFixed(1)} ms` });
    s.style.left = `${((a.started_at - start) / span) * 100}%`;
    s.style.width = `${Math.max(1, (a.duration_ms / span) * 100)}%`;
    bar.append(s);
  }
  return bar;
}

function renderDlq(dlq) {
  const box = $("dlq");
  box.replaceChildren();
  $("redrive").disabled = !dlq.length;
  if (!dlq.length) box.append(el("p", { class: "empty" }, "Empty."));
  for (const r of dlq) {
    const last = r.attempts[r.attempts.length - 1];
    box.append(
      el("div", { class: "invocation", "data-id": r.id },
        el("header", {}, el("code", {}, r.id), el("span", {}, r.ce_type), el("span", {}, `${r.attempts.length} attempt(s)`)),
        el("pre", {}, r.error || (last ? `HTTP ${last.status}` : "failed"))),
    );
  }
}

async function invoke(event) {
  event.preventDefault();
  const name = selected;
  const out = $("invoke-result");
  out.className = "";
  out.textContent = "…";
  try {
    const r = await api("POST", `/v1/functions/${encodeURIComponent(name)}/invoke`, {
      method: $("invoke-method").value || "GET",
      path: $("invoke-path").value || "/",
    });
    invoked.set(r.invocation_id, { function: name, status: r.status, duration_ms: r.duration_ms, at: Date.now() });
    out.className = r.status < 400 ? "ok" : "error";
    out.textContent = `HTTP ${r.status} in ${r.duration_ms.toFixed(1)} ms · ${r.invocation_id}`;
    out.dataset.id = r.invocation_id;
    await renderDetail();
  } catch (e) {
    out.className = "error";
    out.textContent = e.message;
  }
}

async function redrive() {
  await api("POST", `/v1/functions/${encodeURIComponent(selected)}/dlq/redrive`, { all: true });
  await renderDetail();
}

// The live log tail: Server-Sent Events read through fetch, which (unlike
// EventSource) can send the token.
async function follow(name) {
  tailAbort?.abort();
  const abort = new AbortController();
  tailAbort = abort;
  const tail = $("tail");
  try {
    const resp = await fetch(`/v1/functions/${encodeURIComponent(name)}/logs?follow=true&limit=100`, {
      headers: { authorization: `Bearer ${token}` },
      signal: abort.signal,
    });
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data) continue;
        const line = JSON.parse(data);
        tail.append(`${new Date(line.at).toLocaleTimeString()} ${line.invocation.slice(0, 8)} ${line.text}\n`);
        while (tail.childNodes.length > 500) tail.firstChild.remove();
        tail.scrollTop = tail.scrollHeight;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") tail.append(`(the live log stopped: ${e.message})\n`);
  }
}

$("login-form").addEventListener("submit", login);
$("logout").addEventListener("click", () => logout());
$("invoke-form").addEventListener("submit", invoke);
$("redrive").addEventListener("click", redrive);
if (token) login();
