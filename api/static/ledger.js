// The ledger page: calls the JSON API (same origin) with the key kept in this tab's sessionStorage.
// Every element is built from text with el(): nothing that an API user wrote is ever parsed as HTML.
"use strict";
(() => {
  const KEY_STORAGE = "knowpatch.apiKey";
  const POLL_MS = 1000; // how often an open audit refreshes while the worker still has work on it
  const POLL_LIMIT = 120; // ...and for at most this many refreshes
  const $ = (id) => document.getElementById(id);

  // ---- DOM helpers -------------------------------------------------------------------------------

  /** An element with attributes and children; strings become text nodes, null/false are skipped. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const table = (head, rows, attrs) => el("table", attrs, el("thead", null, el("tr", null, head.map((h) => el("th", null, h)))),
    el("tbody", null, rows));
  const json = (value) => JSON.stringify(value, null, 2);
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
  const show = (value) => (value === null || value === undefined || value === "" ? "–" : String(value));
  const badge = (status) => el("span", { class: `badge status-${status}` }, status);

  function say(node, text, kind) {
    node.textContent = text || "";
    node.className = `message ${kind || ""}`;
  }

  // ---- the API -----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, type, message) {
      super(`${status ? `${status} ` : ""}${type}: ${message}`);
      this.status = status;
    }
  }

  const apiKey = () => sessionStorage.getItem(KEY_STORAGE) || "";

  /** The API's JSON reply; an ApiError carrying the server's own message when it refuses. */
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let reply;
    try {
      reply = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (err) {
      throw new ApiError(0, "NetworkError", `the server did not answer (${err.message})`);
    }
    const data = await reply.json().catch(() => null);
    if (!reply.ok) {
      const error = (data && data.error) || {};
      throw new ApiError(reply.status, error.type || reply.statusText || "Error", error.message || "no message");
    }
    return data;
  }

  // ---- key and server ----------------------------------------------------------------------------

  function showKeyState() {
    $("key-state").textContent = apiKey() ? "a key is set for this tab" : "no key set";
  }

  async function showServerInfo() {
    try {
      const info = await api("GET", "info");
      const auth = info.auth_enabled ? "API keys required" : "no API keys configured: no key needed";
      const parts = [`model ${show(info.model)}`, `version ${show(info.model_version)}`, `method ${info.method}`,
        `${show(info.pending_operations)} operations pending`, auth];
      $("server-info").textContent = parts.join(" · ") + (info.problems.length ? ` · problems: ${info.problems.join("; ")}` : "");
    } catch (err) {
      $("server-info").textContent = `server info unavailable: ${err.message}`;
    }
  }

  // ---- the list ----------------------------------------------------------------------------------

  // cursors[i] is the cursor of page i (null: the first); next is the server's next_cursor.
  // loads counts the requests sent, so that only the latest one's answer is shown.
  const listing = { cursors: [null], page: 0, next: null, items: [], loads: 0 };

  function listQuery() {
    const query = new URLSearchParams({ limit: $("filter-limit").value });
    if ($("filter-status").value) query.set("status", $("filter-status").value);
    if ($("filter-subject").value) query.set("subject", $("filter-subject").value);
    const cursor = listing.cursors[listing.page];
    if (cursor) query.set("cursor", cursor);
    return query;
  }

  async function loadPage(page) {
    listing.page = page;
    const load = ++listing.loads;
    say($("ledger-message"), "loading…");
    try {
      const reply = await api("GET", `edits?${listQuery()}`);
      if (load !== listing.loads) return;
      listing.items = reply.items;
      listing.next = reply.next_cursor;
      listing.cursors.length = page + 1;
      say($("ledger-message"), reply.items.length ? "" : "no edits match");
    } catch (err) {
      if (load !== listing.loads) return;
      listing.items = [];
      listing.next = null;
      say($("ledger-message"), err.message, "error");
    }
    renderList();
  }

  function editRow(edit) {
    const request = edit.request || {};
    const target = `#/edits/${encodeURIComponent(edit.id)}`;
    const open = (event) => {
      event.preventDefault();
      if (location.hash === target) loadAudit(edit.id); // no hashchange: open it again by hand
      else location.hash = target;
    };
    return el("tr", { "data-id": edit.id, class: "clickable", onclick: open },
      el("td", null, show(edit.seq)),
      el("td", null, badge(edit.status)),
      el("td", null, el("a", { href: target, class: "subject" }, edit.subject)),
      el("td", null, el("span", { class: "prompt" }, show(request.prompt)), " → ",
        el("strong", null, show(request.target_new)),
        request.target_true ? el("span", { class: "muted" }, ` (${request.target_true})`) : null),
      el("td", null, edit.requested_by),
      el("td", null, when(edit.created_at)),
      el("td", null, show(edit.model_version)));
  }

  function matches(edit, needle) {
    const request = edit.request || {};
    const haystack = [edit.id, edit.subject, edit.status, edit.requested_by, request.prompt, request.target_new,
      request.target_true].join("\n").toLowerCase();
    return haystack.includes(needle);
  }

  function renderList() {
    const needle = $("search").value.trim().toLowerCase();
    const shown = listing.items.filter((edit) => !needle || matches(edit, needle));
    $("edits").tBodies[0].replaceChildren(...shown.map(editRow));
    const hidden = listing.items.length - shown.length;
    const count = listing.items.length;
    $("page-label").textContent = `page ${listing.page + 1} · ${count} edit${count === 1 ? "" : "s"}` +
      (hidden ? ` (${hidden} hidden by the search)` : "");
    $("first-page").disabled = $("prev-page").disabled = listing.page === 0;
    $("next-page").disabled = !listing.next;
  }

  function reloadList() {
    listing.cursors = [null];
    loadPage(0);
  }

  // ---- one edit's audit --------------------------------------------------------------------------

  const audit = { id: null, record: null, timer: null, polls: 0, rollbackPending: false };

  const probability = (p) => (typeof p !== "number" ? "–" : p >= 0.001 ? p.toFixed(3) : p.toExponential(1));

  function probabilityCell(metrics, section, index, target) {
    const part = metrics && metrics[section];
    const row = Array.isArray(part) ? part[index] : part;
    const value = row ? row[target] : undefined;
    return el("td", { class: "num", title: typeof value === "number" ? String(value) : null,
      "data-target": target }, probability(value));
  }

  function probabilitiesTable(record) {
    const request = record.request;
    const rows = [["prompt", 0, request.prompt]]
      .concat((request.rephrase_prompts || []).map((p, i) => ["rephrase", i, p]))
      .concat((request.locality_prompts || []).map((p, i) => ["locality", i, p]));
    const { metrics_before: before, metrics_after: after } = record;
    return table(["", "prompt", "P(new) before", "P(new) after", "P(true) before", "P(true) after"],
      rows.map(([section, i, text]) => el("tr", { "data-section": `${section}-${i}` },
        el("th", null, section), el("td", null, text),
        probabilityCell(before, section, i, "target_new"), probabilityCell(after, section, i, "target_new"),
        probabilityCell(before, section, i, "target_true"), probabilityCell(after, section, i, "target_true"))),
      { id: "probabilities" });
  }

  /** {a: {b: 1}, c: [2]} -> [["a.b", "1"], ["c", "[2]"]]: settings and gates of any shape, as rows. */
  function flatten(value, prefix) {
    if (typeof value === "string") return [[prefix, value]];
    if (value === null || typeof value !== "object" || Array.isArray(value)) return [[prefix, JSON.stringify(value)]];
    const entries = Object.entries(value);
    if (!entries.length) return [[prefix, "{}"]];
    return entries.flatMap(([key, inner]) => flatten(inner, prefix ? `${prefix}.${key}` : key));
  }

  const keyValueTable = (value, id) => table(["name", "value"],
    flatten(value, "").map(([name, text]) => el("tr", null, el("th", null, name), el("td", { class: "mono" }, text))), { id });
  const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);

  /** {gate: {passed, value, ...}} as one row per gate (a failed one marked); any other shape as name/value rows. */
  function gatesTable(gates, id) {
    const rows = isObject(gates) ? Object.entries(gates) : [];
    if (!rows.length || !rows.every(([, gate]) => isObject(gate))) return keyValueTable(gates, id);
    const columns = [...new Set(rows.flatMap(([, gate]) => Object.keys(gate)))];
    const cell = (value) => (value === undefined ? "–" : typeof value === "string" ? value : JSON.stringify(value));
    return table(["gate", ...columns], rows.map(([name, gate]) => el("tr", { class: gate.passed === false ? "failed" : null },
      el("th", null, name), columns.map((column) => el("td", { class: "mono" }, cell(gate[column]))))), { id });
  }

  function gatesSection(record) {
    // Quality gates are recorded in the metrics when the server has them; nothing is shown otherwise.
    const found = [["before", record.metrics_before], ["after", record.metrics_after]]
      .filter(([, metrics]) => metrics && metrics.gates !== undefined);
    if (!found.length) return null;
    return el("section", { id: "gates" }, el("h3", null, "Quality gates"),
      found.map(([when_, metrics]) => [el("h4", null, when_), gatesTable(metrics.gates, `gates-${when_}`)]));
  }

  const facts = (pairs) => el("dl", { class: "facts" }, pairs.map(([name, value]) => [el("dt", null, name), el("dd", null, value)]));

  function requestSection(request) {
    const list = (items) => (items && items.length ? el("ol", null, items.map((p) => el("li", null, p))) : "–");
    return el("section", { id: "request" }, el("h3", null, "Request"), facts([
      ["subject", request.subject], ["prompt", request.prompt], ["new target", request.target_new],
      ["true target", show(request.target_true)], ["rephrase prompts", list(request.rephrase_prompts)],
      ["locality prompts", list(request.locality_prompts)], ["method", show(request.method)],
      ["metadata", request.metadata ? el("pre", null, json(request.metadata)) : "–"],
    ]));
  }

  function recordSection(record) {
    return el("section", { id: "record" }, facts([
      ["status", badge(record.status)], ["requested by", record.requested_by], ["method", record.method],
      ["seq", show(record.seq)], ["model version", show(record.model_version)], ["batch", show(record.batch_id)],
      ["queue position", show(record.queue_position)], ["created", when(record.created_at)],
      ["applied", when(record.applied_at)], ["rolled back", when(record.rolled_back_at)],
      ["layers", record.layers ? record.layers.join(", ") : "–"],
      ["error", record.error ? el("span", { class: "error" }, record.error) : "–"],
      ["rollback reason", show(record.rollback_reason)],
    ]));
  }

  function normsAndFactors(record) {
    const norms = Object.entries(record.update_norms || {});
    return [
      el("h3", null, "Update norms"),
      norms.length ? table(["layer", "‖ΔW‖"], norms.map(([layer, norm]) => el("tr", null, el("td", null, layer),
        el("td", { class: "num" }, Number(norm).toFixed(4)))), { id: "norms" }) : el("p", { class: "muted" }, "none"),
      el("h3", null, "Factors"),
      record.factors.length ? table(["layer", "checksum", "dtype", "shapes"], record.factors.map((f) => el("tr", null,
        el("td", null, f.layer), el("td", { class: "mono checksum" }, f.checksum), el("td", null, f.dtype),
        el("td", { class: "mono" }, Object.entries(f.shapes).map(([n, s]) => `${n} [${s.join("×")}]`).join(", ")))),
      { id: "factors" }) : el("p", { class: "muted" }, "none stored"),
    ];
  }

  function historySection(record) {
    return [el("h3", null, "History"), table(["event", "actor", "reason", "seq", "at"],
      record.history.map((e) => el("tr", null, el("td", null, e.event), el("td", null, show(e.actor)),
        el("td", null, show(e.reason)), el("td", null, show(e.seq)), el("td", null, when(e.at)))), { id: "history" })];
  }

  function actionsSection(record) {
    if (record.status === "applied") {
      const reason = el("input", { id: "rollback-reason", type: "text", required: true, maxlength: 1000,
        placeholder: "why (kept in the audit trail)" });
      return el("form", { id: "rollback-form", class: "row actions", onsubmit: (e) => { e.preventDefault(); rollback(reason.value); } },
        el("label", null, "Reason ", reason), el("button", { type: "submit", class: "danger" }, "Roll back"),
        el("span", { class: "muted" }, "needs a key with the edits:admin scope"));
    }
    if (record.status === "queued") {
      return el("div", { class: "row actions" },
        el("button", { type: "button", id: "cancel-edit", class: "danger", onclick: cancel }, "Cancel this queued edit"),
        el("span", { class: "muted" }, "needs edits:write (an admin key has it)"));
    }
    return null;
  }

  function renderAudit(record) {
    audit.record = record;
    $("audit-title").replaceChildren("Edit ", el("span", { class: "mono" }, record.id), " ", badge(record.status));
    $("audit-body").replaceChildren(
      actionsSection(record) || "",
      recordSection(record), requestSection(record.request),
      el("section", null, el("h3", null, "Probabilities before / after"), probabilitiesTable(record)),
      gatesSection(record) || "",
      el("section", null, ...normsAndFactors(record)),
      el("section", null, ...historySection(record)),
      el("section", null, el("h3", null, "Settings"),
        record.settings ? keyValueTable(record.settings, "settings") : el("p", { class: "muted" }, "not recorded yet")),
    );
    $("audit").hidden = false;
  }

  function stillMoving(record) {
    return ["queued", "applying"].includes(record.status) || (audit.rollbackPending && record.status === "applied");
  }

  async function loadAudit(id, { quiet } = {}) {
    clearTimeout(audit.timer);
    if (id !== audit.id) Object.assign(audit, { id, record: null, polls: 0, rollbackPending: false });
    if (!quiet) say($("audit-message"), "loading…");
    try {
      const record = await api("GET", `edits/${encodeURIComponent(id)}`);
      if (id !== audit.id) return; // another edit was opened meanwhile
      const moved = audit.record && audit.record.status !== record.status;
      renderAudit(record);
      if (moved) loadPage(listing.page); // the list shows the new status, on the same page
      if (!quiet) say($("audit-message"), "");
      if (audit.rollbackPending && record.status !== "applied") audit.rollbackPending = false;
      if (stillMoving(record) && audit.polls++ < POLL_LIMIT) {
        audit.timer = setTimeout(() => loadAudit(id, { quiet: true }), POLL_MS);
      }
    } catch (err) {
      if (id !== audit.id) return;
      $("audit").hidden = false;
      if (!audit.record) { $("audit-title").textContent = "Edit"; $("audit-body").replaceChildren(); }
      say($("audit-message"), err.message, "error");
    }
  }

  async function rollback(reason) {
    const id = audit.id;
    say($("audit-message"), "asking for a rollback…");
    try {
      const reply = await api("POST", `edits/${encodeURIComponent(id)}/rollback`, { reason });
      say($("audit-message"), `rollback queued as seq ${reply.rollback_seq} (${reply.queue_position} operations ahead); ` +
        "the edit stays applied until the worker reverts it", "ok");
      Object.assign(audit, { rollbackPending: true, polls: 0 });
      await loadAudit(id, { quiet: true });
      loadPage(listing.page);
    } catch (err) {
      say($("audit-message"), err.message, "error");
    }
  }

  async function cancel() {
    const id = audit.id;
    say($("audit-message"), "cancelling…");
    try {
      renderAudit(await api("DELETE", `edits/${encodeURIComponent(id)}`));
      say($("audit-message"), "cancelled", "ok");
      loadPage(listing.page);
    } catch (err) {
      say($("audit-message"), err.message, "error");
    }
  }

  function followHash() {
    const match = /^#\/edits\/([^/]+)$/.exec(location.hash);
    if (match) {
      loadAudit(decodeURIComponent(match[1]));
    } else {
      clearTimeout(audit.timer);
      audit.id = null;
      $("audit").hidden = true;
    }
  }

  // ---- playground --------------------------------------------------------------------------------

  const optionalInt = (input) => (input.value === "" ? undefined : Number(input.value));

  async function generate(event) {
    event.preventDefault();
    const prompt = $("gen-prompt").value;
    const body = { inputs: prompt, parameters: { max_new_tokens: optionalInt($("gen-max")), do_sample: false } };
    if ($("gen-min-version").value !== "") body.min_model_version = optionalInt($("gen-min-version"));
    say($("gen-message"), "generating…");
    $("gen-result").hidden = true;
    try {
      const reply = await api("POST", "generate", body);
      $("gen-text-prompt").textContent = prompt;
      $("gen-text").textContent = reply.generated_text;
      $("gen-version").textContent = String(reply.model_version);
      $("gen-details").textContent = `${reply.details.generated_tokens} tokens · finished: ${reply.details.finish_reason}`;
      $("gen-result").hidden = false;
      say($("gen-message"), "");
    } catch (err) {
      say($("gen-message"), err.message, "error");
    }
  }

  async function score(event) {
    event.preventDefault();
    const candidates = $("score-candidates").value.split("\n").map((c) => c.replace(/\r$/, "")).filter((c) => c.trim());
    say($("score-message"), "scoring…");
    $("score-result").hidden = true;
    try {
      const reply = await api("POST", "score", { prompt: $("score-prompt").value, candidates });
      $("score-result").querySelector("tbody").replaceChildren(...reply.scores.map((s) => el("tr",
        { class: s.candidate === reply.best ? "best" : null },
        el("td", { class: "mono" }, JSON.stringify(s.candidate)), el("td", { class: "num" }, s.total_logprob.toFixed(3)),
        el("td", { class: "num" }, s.mean_logprob.toFixed(3)), el("td", { class: "num" }, s.tokens))));
      $("score-version").textContent = String(reply.model_version);
      $("score-result").hidden = false;
      say($("score-message"), "");
    } catch (err) {
      say($("score-message"), err.message, "error");
    }
  }

  // ---- wiring ------------------------------------------------------------------------------------

  function refreshAll() {
    showKeyState();
    showServerInfo();
    reloadList();
    if (audit.id) loadAudit(audit.id);
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    refreshAll();
  });
  $("forget-key").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORAGE); refreshAll(); });
  $("filters").addEventListener("submit", (event) => { event.preventDefault(); reloadList(); });
  $("filter-status").addEventListener("change", reloadList);
  $("filter-limit").addEventListener("change", reloadList);
  $("search").addEventListener("input", renderList);
  $("first-page").addEventListener("click", reloadList);
  $("prev-page").addEventListener("click", () => loadPage(listing.page - 1));
  $("next-page").addEventListener("click", () => {
    listing.cursors[listing.page + 1] = listing.next;
    loadPage(listing.page + 1);
  });
  $("audit-refresh").addEventListener("click", () => audit.id && loadAudit(audit.id));
  $("audit-close").addEventListener("click", () => { location.hash = ""; });
  $("generate-form").addEventListener("submit", generate);
  $("score-form").addEventListener("submit", score);
  window.addEventListener("hashchange", followHash);

  showKeyState();
  showServerInfo();
  reloadList();
  followHash();
})();
