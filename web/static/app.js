/* Freshet web UI: plain JS, no build step. Data comes from /api/v1 with the token kept in
   localStorage; all server text is inserted with textContent, never as HTML. */
"use strict";

const TOKEN_KEY = "freshet.token";

function token() { return localStorage.getItem(TOKEN_KEY) || ""; }

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token()) h.Authorization = "Bearer " + token();
  return h;
}

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

async function apiJson(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    const error = new Error(response.status + ": " + message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function documentUrl(table, key) {
  return "/documents/" + encodeURIComponent(table) + "/" + key.split("/").map(encodeURIComponent).join("/");
}

function formatTime(iso) {
  if (!iso) return "unknown";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

/* --- token ------------------------------------------------------------------------------ */
async function showWho() {
  const who = document.getElementById("whoami");
  if (!who) return;
  try {
    const me = await apiJson("/api/v1/me");
    who.textContent = "signed in as " + me.user + (me.admin ? " (admin)" :
      me.groups.length ? " (" + me.groups.join(", ") + ")" : " (public only)");
  } catch (e) { who.textContent = e.message; }
}

function setupToken() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  input.value = token();
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = input.value.trim();
    if (value) localStorage.setItem(TOKEN_KEY, value); else localStorage.removeItem(TOKEN_KEY);
    showWho();
    document.dispatchEvent(new CustomEvent("freshet:token"));
  });
  showWho();
}

/* --- ask (streamed over server-sent events) --------------------------------------------- */
function parseEvents(buffer, onEvent) {
  let index;
  while ((index = buffer.indexOf("\n\n")) >= 0) {
    const raw = buffer.slice(0, index);
    buffer = buffer.slice(index + 2);
    let name = "message";
    const data = [];
    for (const line of raw.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trim());
    }
    if (data.length) onEvent(name, JSON.parse(data.join("\n")));
  }
  return buffer;
}

function sourceItem(c) {
  const item = el("li", null, { value: String(c.n) });
  const link = el("a", c.source_table + " / " + c.doc_key + (c.title ? " — " + c.title : ""),
    { href: documentUrl(c.source_table, c.doc_key) + "#chunk-" + c.chunk_id });
  item.append(link, el("span", " version " + c.source_lsn + ", committed " + formatTime(c.source_ts), { class: "meta" }));
  return item;
}

function renderCitations(answer) {
  const list = document.getElementById("citations");
  list.classList.remove("reading");
  list.replaceChildren();
  for (const c of answer.citations) list.append(sourceItem(c));
  document.getElementById("as-of").textContent =
    answer.as_of ? "As of " + formatTime(answer.as_of) + " (newest cited source commit)" : "";
}

function showWithheld(data) {
  document.getElementById("ask-error").textContent = "Withheld by the answer rules" +
    (data.rules_version ? " (rule set " + data.rules_version + ")" : "") + ": " +
    data.violations.map((v) => v.rule + " (" + v.message + ")").join("; ");
}

/* After an answer is shown: look at it again every few seconds while the page is open, and
   say so when a row it cites has changed since (the stale watcher marks it). */
let staleWatch = null;
const STALE_EVERY_MS = 3000;
const STALE_FOR_MS = 10 * 60 * 1000;

function stopStaleWatch() {
  if (staleWatch) clearTimeout(staleWatch.timer);
  staleWatch = null;
  document.getElementById("stale-banner").hidden = true;
}

function watchStale(id, secret, question, k) {
  stopStaleWatch();
  const watch = { id: id, until: Date.now() + STALE_FOR_MS, timer: null };
  staleWatch = watch;
  const extra = secret ? { "Freshet-Answer-Secret": secret } : {};
  const look = async () => {
    if (staleWatch !== watch || Date.now() > watch.until) return;
    try {
      const data = await apiJson("/api/v1/answers/" + encodeURIComponent(id), { headers: extra });
      if (data.stale) {
        const c = data.stale.changes[0] || {};
        document.getElementById("stale-text").textContent =
          "A source this answer cites has changed since (" + (c.source_table || "?") + " / " +
          (c.doc_key || "?") + ": " + (c.op || "changed") + ", " + formatTime(c.committed_at) +
          "). The answer may be out of date.";
        const banner = document.getElementById("stale-banner");
        banner.hidden = false;
        document.getElementById("re-ask").onclick = () => {
          if (document.getElementById("ask-async").checked) askQueued(question, k);
          else ask(question, k);
        };
        return;
      }
    } catch (e) { /* the next look tries again */ }
    watch.timer = setTimeout(look, STALE_EVERY_MS);
  };
  watch.timer = setTimeout(look, STALE_EVERY_MS);
}

function clearAnswer() {
  stopStaleWatch();
  document.getElementById("answer").textContent = "";
  document.getElementById("ask-error").textContent = "";
  document.getElementById("citations").replaceChildren();
  document.getElementById("as-of").textContent = "";
  const steps = document.getElementById("ask-steps");
  steps.replaceChildren();
  steps.hidden = true;
}

/* The steps an async answer has finished, in order, then what it waits for. */
function renderSteps(data, started) {
  const list = document.getElementById("ask-steps");
  list.hidden = false;
  list.replaceChildren();
  for (const s of data.steps || []) {
    const seconds = ((new Date(s.done_at) - started) / 1000).toFixed(1);
    const parts = s.parts ? " " + s.parts_done + " of " + s.parts + " parts" : "";
    list.append(el("li", s.step + parts + " (" + seconds + " s)", { class: "done", "data-step": s.step }));
  }
  if (data.status === "pending") list.append(el("li", "waiting for the next step…", { class: "waiting" }));
}

/* An async ask: queue it, then read it back until a step has finished it or its deadline passed. */
async function askQueued(question, k) {
  const out = document.getElementById("answer");
  const error = document.getElementById("ask-error");
  clearAnswer();
  out.setAttribute("aria-busy", "true");
  try {
    const body = { question: question, async: true };
    if (k) body.k = k;
    let data = await apiJson("/api/v1/ask", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const started = new Date(data.created_at);
    const until = Date.parse(data.deadline || "") + 10000 || Date.now() + 130000;
    const extra = data.secret ? { "Freshet-Answer-Secret": data.secret } : {};
    out.textContent = "Queued; the answer appears once every step has finished.";
    renderSteps(data, started);
    while (data.status === "pending" && Date.now() < until) {
      await new Promise((resolve) => setTimeout(resolve, 400));
      data = await apiJson("/api/v1/answers/" + encodeURIComponent(data.id), { headers: extra });
      renderSteps(data, started);
    }
    if (data.status === "approved" || data.status === "rejected") {
      out.textContent = data.answer;
      renderCitations(data);
      if (data.status === "rejected") showWithheld(data);
      else watchStale(data.id, extra["Freshet-Answer-Secret"], question, k);
    } else if (data.status === "pending") {
      out.textContent = "";
      error.textContent = "Still pending after its deadline: are the workflow's workers running?";
    } else {
      out.textContent = "";
      error.textContent = (data.status === "timeout" ? "Timed out: " : "Failed: ") + data.error;
    }
  } catch (e) {
    error.textContent = e.message;
  } finally {
    out.setAttribute("aria-busy", "false");
  }
}

async function ask(question, k) {
  const out = document.getElementById("answer");
  const error = document.getElementById("ask-error");
  clearAnswer();
  out.setAttribute("aria-busy", "true");
  try {
    const response = await fetch("/api/v1/ask", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify({ question: question, k: k, stream: true }),
    });
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch (e) { body = null; }
      throw new Error(response.status + ": " + (body && body.error ? body.error.message : response.statusText));
    }
    let secret = null;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (name, data) => {
        if (name === "start") secret = data.secret || null;
        if (name === "start" && data.buffered) {
          // Answer rules are configured: no text is sent before they have judged it.
          out.textContent = "Reading " + data.passages + " passage(s); the answer appears once the answer rules have checked it.";
        }
        else if (name === "passage") {
          const list = document.getElementById("citations");
          list.classList.add("reading");
          list.append(sourceItem(data));
        }
        else if (name === "token") out.textContent += data.text;
        else if (name === "done") {
          out.textContent = data.answer;
          renderCitations(data);
          if (data.status === "rejected") showWithheld(data);
          else watchStale(data.id, secret, question, k);
        }
        else if (name === "error") {
          error.textContent = data.message;
          document.getElementById("citations").replaceChildren();
        }
      });
    }
  } catch (e) {
    error.textContent = e.message;
  } finally {
    out.setAttribute("aria-busy", "false");
  }
}

function setupAsk() {
  const form = document.getElementById("ask-form");
  const question = document.getElementById("question");
  question.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = question.value.trim();
    const k = parseInt(document.getElementById("ask-k").value, 10) || 5;
    if (!text) return;
    if (document.getElementById("ask-async").checked) askQueued(text, k);
    else ask(text, k);
  });
}

/* --- search ----------------------------------------------------------------------------- */
/* The form's search as query parameters: the same for the API and for the page's own link
   (/search?q=...&mode=..., which the server renders back into the form). */
function searchParams() {
  const params = new URLSearchParams({
    q: document.getElementById("q").value,
    mode: document.getElementById("mode").value,
  });
  const table = document.getElementById("table").value;
  if (table) params.set("table", table);
  const k = document.getElementById("k").value;
  if (k) params.set("k", k);  // an empty field: the API's default, not `k=` (a 400)
  if (document.getElementById("dedupe").checked) params.set("dedupe", "true");
  return params;
}

async function runSearch() {
  const params = searchParams();
  // The address bar holds this search, so the link can be shared (or reloaded).
  history.replaceState(null, "", location.pathname + "?" + params.toString());
  const list = document.getElementById("results");
  const error = document.getElementById("search-error");
  list.replaceChildren(); error.textContent = "";
  list.setAttribute("aria-busy", "true");
  try {
    const body = await apiJson("/api/v1/search?" + params.toString());
    if (!body.results.length) error.textContent = "No results you may see.";
    for (const r of body.results) {
      const item = el("li");
      item.append(el("a", r.source_table + " / " + r.doc_key + (r.title ? " — " + r.title : ""),
        { href: documentUrl(r.source_table, r.doc_key) + "#chunk-" + r.chunk_id }));
      item.append(el("span", " score " + r.score.toFixed(4) + ", committed " + formatTime(r.source_ts), { class: "meta" }));
      item.append(el("p", r.text.length > 400 ? r.text.slice(0, 400) + "…" : r.text));
      list.append(item);
    }
  } catch (e) { error.textContent = e.message; }
  finally { list.setAttribute("aria-busy", "false"); }
}

function setupSearch() {
  const form = document.getElementById("search-form");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    runSearch();
  });
  // Opened with ?q=...: the server filled the form; run that search without typing.
  if (form.dataset.run === "true" && document.getElementById("q").value.trim()) runSearch();
}

/* --- document --------------------------------------------------------------------------- */
async function loadDocument() {
  const article = document.getElementById("document");
  const path = "/api/v1/documents/" + encodeURIComponent(article.dataset.source) + "/" +
    article.dataset.key.split("/").map(encodeURIComponent).join("/");
  try {
    const doc = await apiJson(path);
    document.getElementById("doc-title").textContent = doc.title || (doc.source_table + " / " + doc.doc_key);
    const meta = document.getElementById("doc-meta");
    const rows = [["source", doc.source_table + " / " + doc.doc_key], ["version (LSN)", doc.source_lsn],
      ["committed", formatTime(doc.source_ts)], ["indexed", formatTime(doc.indexed_at)],
      ["groups", doc.access_groups.length ? doc.access_groups.join(", ") : "public"]];
    for (const [k, v] of rows) meta.append(el("dt", k), el("dd", v));
    const chunks = document.getElementById("doc-chunks");
    for (const c of doc.chunks) {
      const section = el("section", null, { id: "chunk-" + c.chunk_id, tabindex: "-1", class: "chunk" });
      section.append(el("h2", "Chunk " + (c.chunk_index + 1)), el("pre", c.text));
      chunks.append(section);
    }
    if (location.hash) { const t = document.querySelector(location.hash); if (t) { t.focus(); t.scrollIntoView(); } }
  } catch (e) { document.getElementById("doc-error").textContent = e.message; }
}

/* --- status ----------------------------------------------------------------------------- */
function row(cells) {
  const tr = el("tr");
  for (const c of cells) tr.append(el("td", c === null || c === undefined ? "" : c));
  return tr;
}

/* The verify runs over time: one bar per run, its height the differences found (green: in
   sync). Built with DOM calls, no library. */
function drawDrift(runs) {
  const figure = document.getElementById("drift");
  if (!figure) return;
  figure.hidden = runs.length < 2;
  const svg = document.getElementById("drift-chart");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const most = Math.max(1, ...runs.map((r) => r.differences));
  const width = 480 / Math.max(runs.length, 1);
  runs.forEach((r, i) => {
    const h = r.in_sync ? 4 : 4 + 72 * (r.differences / most);
    const bar = document.createElementNS(ns, "rect");
    bar.setAttribute("x", String(i * width + 1));
    bar.setAttribute("y", String(78 - h));
    bar.setAttribute("width", String(Math.max(1, width - 2)));
    bar.setAttribute("height", String(h));
    bar.setAttribute("fill", r.in_sync ? "#2e7d32" : "#c62828");
    const title = document.createElementNS(ns, "title");
    title.textContent = formatTime(r.finished_at) + ": " +
      (r.in_sync ? "in sync" : r.differences + " differences") + ", " + r.rows_checked + " rows";
    bar.append(title);
    svg.append(bar);
  });
  const differing = runs.filter((r) => !r.in_sync).length;
  document.getElementById("drift-caption").textContent =
    "freshet verify, last " + runs.length + " runs (oldest left): " + differing + " differing";
}

async function loadStatus() {
  const error = document.getElementById("status-error");
  const hint = document.getElementById("status-hint");
  error.textContent = "";
  try {
    const s = await apiJson("/api/v1/status");
    const comp = document.querySelector("#components tbody");
    comp.replaceChildren(
      row(["postgres", s.postgres.state, s.postgres.version || s.postgres.error || ""]),
      row(["kafka connect", s.connect.state, s.connect.url]),
      row(["connector " + s.connector.name, s.connector.state, ""]),
      row(["answer backend", s.llm_backend, ""]));
    const index = document.getElementById("index");
    index.replaceChildren();
    const counts = s.index || {};
    for (const [k, v] of [["documents", counts.documents], ["deleted documents", counts.deleted_documents],
      ["chunks", counts.chunks], ["dead letters (unresolved)", s.dead_letters],
      ["newest source commit", formatTime(counts.newest_source_ts)], ["last indexed", formatTime(counts.last_indexed_at)],
      ["answers approved / rejected", counts.answers_approved + " / " + counts.answers_rejected],
      ["answers pending / failed", counts.answers_pending + " / " + counts.answers_failed]]) {
      index.append(el("dt", k), el("dd", v === undefined ? "unknown" : v));
    }
    const conv = s.convergence || {};
    const verify = conv.verify;
    const differences = verify
      ? Object.entries(verify.counts).filter(([, n]) => n).map(([k, n]) => k + " " + n).join(", ") || "none"
      : "";
    document.getElementById("convergence").replaceChildren(
      el("dt", "last freshet verify"),
      el("dd", verify ? (verify.in_sync ? "in sync" : "differs") + ", " + formatTime(verify.finished_at) +
        ", " + verify.rows_checked + " rows" : "never run"),
      el("dt", "differences"), el("dd", differences),
      el("dt", "hidden documents"), el("dd", conv.hidden_documents === undefined ? "unknown" : conv.hidden_documents));
    drawDrift(conv.history || []);
    document.getElementById("mapping-problems").replaceChildren(
      ...(conv.mapping_problems || []).map((p) => el("li",
        "mapping of " + p.table + " does not fit: column " + p.column + ": " + p.problem +
        " (" + p.occurrences + " events)")));
    document.querySelector("#tasks tbody").replaceChildren(
      ...(s.connector.tasks || []).map((t) => row([t.id, t.state, t.worker])));
    document.querySelector("#workers tbody").replaceChildren(
      ...(s.workers || []).map((w) => row([w.worker_id, w.state, Math.round(w.heartbeat_age_s),
        w.events_applied, Number(w.events_per_sec).toFixed(1), w.last_error || ""])));
    if (hint) hint.hidden = true;  // the token works: where to find one is no longer news
  } catch (e) {
    error.textContent = e.message;
    // Refused for want of an admin token: say again where one comes from (any other failure,
    // such as a database that is down, is not about the token).
    if (hint && (e.status === 401 || e.status === 403)) hint.hidden = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupToken();
  const page = document.body.dataset.page;
  if (page === "ask") setupAsk();
  else if (page === "search") setupSearch();
  else if (page === "document") loadDocument();
  else if (page === "status") {
    document.getElementById("status-refresh").addEventListener("click", loadStatus);
    document.addEventListener("freshet:token", loadStatus);  // a pasted token applies at once
    loadStatus();
    setInterval(loadStatus, 10000);
  }
});
