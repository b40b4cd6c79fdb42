// memllm web page: chat sessions and knowledge bases over the native HTTP API (docs/api-contract.md).
// Plain ES module, no build step, no dependencies.

const $ = (sel, root = document) => root.querySelector(sel);

// ---------- small DOM helper ----------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key === "testid") el.dataset.testid = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

// A trash-can icon drawn inline (no icon font or emoji font needed).
function trashIcon() {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("width", "16");
  svg.setAttribute("height", "16");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  const path = document.createElementNS(SVG_NS, "path");
  path.setAttribute("d", "M4 7h16M10 11v6M14 11v6M6 7l1 12a2 2 0 0 0 2 2h6a2 2 0 0 0 2-2l1-12M9 7V4h6v3");
  path.setAttribute("fill", "none");
  path.setAttribute("stroke", "currentColor");
  path.setAttribute("stroke-width", "2");
  path.setAttribute("stroke-linecap", "round");
  path.setAttribute("stroke-linejoin", "round");
  svg.append(path);
  return svg;
}

function fmtDate(value) {
  if (!value) return "";
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function fmtScore(x) {
  const a = Math.abs(x);
  return x.toFixed(a >= 100 ? 0 : a >= 10 ? 1 : 3);
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

// ---------- settings (localStorage) ----------

const store = {
  get(key, fallback = "") {
    try {
      return localStorage.getItem(`memllm.${key}`) ?? fallback;
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      if (value === "" || value === null || value === undefined) localStorage.removeItem(`memllm.${key}`);
      else localStorage.setItem(`memllm.${key}`, value);
    } catch {
      /* storage disabled: settings last for this page only */
    }
  },
};

const settingInputs = {
  apiKey: $("#api-key"),
  maxTokens: $("#max-tokens"),
  temperature: $("#temperature"),
  queryMode: $("#query-mode"),
};

for (const [key, input] of Object.entries(settingInputs)) {
  const saved = store.get(key);
  if (saved !== "") input.value = saved;
  input.addEventListener("change", () => {
    store.set(key, input.value.trim());
    if (key === "apiKey") refreshAll();
  });
}

function generationOptions() {
  const opts = {};
  const maxTokens = parseInt(settingInputs.maxTokens.value, 10);
  if (Number.isFinite(maxTokens) && maxTokens > 0) opts.max_tokens = maxTokens;
  const temperature = parseFloat(settingInputs.temperature.value);
  if (Number.isFinite(temperature) && temperature >= 0) opts.temperature = temperature;
  return opts;
}

// ---------- errors shown to the user ----------

const errorsBox = $("#errors");

function showError(err, context = "") {
  if (err && err.name === "AbortError") return;
  const message = (err && err.message) || String(err);
  console.error(context, err);
  const text = context ? `${context}: ${message}` : message;
  // The same message twice in a row is shown once.
  for (const existing of errorsBox.querySelectorAll(".error-text")) {
    if (existing.textContent === text) return;
  }
  const item = h(
    "div",
    { class: "error", testid: "error" },
    h("span", { class: "error-text", text }),
    h("button", {
      type: "button",
      class: "icon-btn",
      "aria-label": "Dismiss error",
      title: "Dismiss",
      text: "×",
      onclick: () => item.remove(),
    }),
  );
  errorsBox.append(item);
  while (errorsBox.children.length > 4) errorsBox.firstElementChild.remove();
}

// ---------- HTTP ----------

class ApiError extends Error {
  constructor(message, status = 0, type = "", code = "") {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.code = code;
  }
}

function headers(extra = {}) {
  const out = { Accept: "application/json", ...extra };
  const key = settingInputs.apiKey.value.trim();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText || "error"}`;
  let type = "";
  let code = "";
  try {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      const e = body && body.error;
      if (e && typeof e === "object") {
        message = e.message || message;
        type = e.type || "";
        code = e.code || "";
      } else if (typeof e === "string") {
        message = e;
      } else if (body && body.detail) {
        message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      }
    } catch {
      if (text.trim()) message = `${message}: ${text.trim().slice(0, 300)}`;
    }
  } catch {
    /* body unreadable: keep the status line */
  }
  if (response.status === 401 && !settingInputs.apiKey.value.trim()) {
    message += " (set an API key in Settings)";
  }
  return new ApiError(message, response.status, type, code);
}

async function api(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, signal, headers: headers() };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // the browser sets the multipart boundary
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`cannot reach the server (${err.message})`);
  }
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// POST with stream:true and read the server-sent events; onDelta(text) for each piece.
// Returns the "done" event (the same object the non-streamed call returns).
async function streamPost(path, body, { signal, onDelta }) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      signal,
      headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify({ ...body, stream: true }),
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`cannot reach the server (${err.message})`);
  }
  if (!response.ok) throw await errorFrom(response);
  const type = response.headers.get("content-type") || "";
  if (!type.includes("text/event-stream")) {
    // A server that answered in one piece: show it as one delta.
    const result = await response.json();
    const text = (result.message && result.message.content) ?? result.answer ?? "";
    if (text) onDelta(text);
    return result;
  }

  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let done = null;
  let finished = false;

  const handleEvent = (block) => {
    const data = block
      .split("\n")
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).replace(/^ /, ""))
      .join("\n");
    if (!data) return;
    if (data === "[DONE]") {
      finished = true;
      return;
    }
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      throw new ApiError(`the server sent an unreadable event: ${data.slice(0, 200)}`);
    }
    if (event.type === "delta") {
      if (event.text) onDelta(event.text);
    } else if (event.type === "done") {
      done = event;
    } else if (event.type === "error") {
      const e = event.error || {};
      throw new ApiError(e.message || "the server reported an error", 0, e.type || "", e.code || "");
    }
  };

  while (!finished) {
    const { value, done: eof } = await reader.read();
    if (eof) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while (!finished && (cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      handleEvent(block);
    }
  }
  if (!finished && buffer.trim()) handleEvent(buffer);
  if (finished) reader.cancel().catch(() => {});
  if (!done) throw new ApiError("the stream ended before the answer was complete");
  return done;
}

// ---------- state ----------

const state = {
  sessions: [],
  kbs: [],
  view: null, // {type: "session" | "kb", id}
  chatStreams: new Map(), // session id -> {controller, bubble}
  askStreams: new Map(), // kb id -> AbortController
  answerBoxes: new Map(), // kb id -> element holding that KB's answers (kept while the page lives)
  pollTimer: null,
  pollKb: null,
};

// ---------- health ----------

const healthEl = $("#health");

async function checkHealth() {
  let ok = false;
  try {
    const r = await fetch("health", { headers: headers() });
    ok = r.ok;
    healthEl.textContent = ok ? "ready" : r.status === 503 ? "loading model…" : `server: ${r.status}`;
  } catch {
    healthEl.textContent = "server unreachable";
  }
  healthEl.dataset.state = ok ? "ok" : "down";
  setTimeout(checkHealth, ok ? 30000 : 2000);
}

// ---------- navigation ----------

function parseHash() {
  const m = /^#(session|kb)\/(\d+)$/.exec(location.hash);
  return m ? { type: m[1], id: Number(m[2]) } : null;
}

function navigate(view) {
  const hash = view ? `#${view.type}/${view.id}` : "";
  if (location.hash !== hash) history.pushState(null, "", hash || location.pathname);
  show(view);
  closeMenuOnNarrow();
}

window.addEventListener("popstate", () => show(parseHash()));

function show(view) {
  const valid =
    view &&
    ((view.type === "session" && state.sessions.some((s) => s.id === view.id)) ||
      (view.type === "kb" && state.kbs.some((k) => k.id === view.id)));
  state.view = valid ? view : null;
  $("#empty-pane").hidden = !!state.view;
  $("#chat-pane").hidden = !(state.view && state.view.type === "session");
  $("#kb-pane").hidden = !(state.view && state.view.type === "kb");
  stopPolling();
  renderSessionList();
  renderKbList();
  if (!state.view) return;
  if (state.view.type === "session") openSession(state.view.id);
  else openKb(state.view.id);
}

// ---------- narrow screens: the sidebar is a drawer ----------

const menuBtn = $("#menu-toggle");
const sidebar = $("#sidebar");
menuBtn.addEventListener("click", () => {
  const open = !sidebar.classList.contains("open");
  sidebar.classList.toggle("open", open);
  menuBtn.setAttribute("aria-expanded", String(open));
});

document.addEventListener("click", (event) => {
  if (sidebar.classList.contains("open") && !sidebar.contains(event.target) && !menuBtn.contains(event.target)) {
    closeMenuOnNarrow();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && sidebar.classList.contains("open")) {
    closeMenuOnNarrow();
    menuBtn.focus();
  }
});

function closeMenuOnNarrow() {
  sidebar.classList.remove("open");
  menuBtn.setAttribute("aria-expanded", "false");
}

$("#settings").addEventListener("submit", (event) => event.preventDefault());

const settingsBtn = $("#settings-toggle");
settingsBtn.addEventListener("click", () => {
  const panel = $("#settings");
  panel.hidden = !panel.hidden;
  settingsBtn.setAttribute("aria-expanded", String(!panel.hidden));
});

// ---------- sidebar lists ----------

function sidebarItem({ kind, item, title, meta, selected, onSelect, onDelete }) {
  return h(
    "li",
    { class: `item${selected ? " selected" : ""}`, testid: `${kind}-item`, dataset: { id: item.id } },
    h(
      "button",
      {
        type: "button",
        class: "item-main",
        "aria-current": selected ? "page" : false,
        testid: `${kind}-select`,
        onclick: onSelect,
      },
      h("span", { class: "item-title", text: title }),
      h("span", { class: "item-meta", text: meta }),
    ),
    h("button", {
      type: "button",
      class: "icon-btn delete",
      "aria-label": `Delete ${title}`,
      title: "Delete",
      testid: `${kind}-delete`,
      onclick: onDelete,
    }, trashIcon()),
  );
}

function sessionTitle(s) {
  return s.name || `Session ${s.id}`;
}

function renderSessionList() {
  const list = $("#session-list");
  list.replaceChildren();
  if (!state.sessions.length) {
    list.append(h("li", { class: "muted empty" }, "No sessions yet."));
    return;
  }
  for (const s of state.sessions) {
    const count = Array.isArray(s.messages) ? s.messages.length : Number(s.messages) || 0;
    const kbCount = (s.kb_ids || []).length;
    const meta = [plural(count, "message"), kbCount ? plural(kbCount, "knowledge base") : ""].filter(Boolean).join(" · ");
    list.append(
      sidebarItem({
        kind: "session",
        item: s,
        title: sessionTitle(s),
        meta,
        selected: state.view && state.view.type === "session" && state.view.id === s.id,
        onSelect: () => navigate({ type: "session", id: s.id }),
        onDelete: () => deleteSession(s),
      }),
    );
  }
}

function renderKbList() {
  const list = $("#kb-list");
  list.replaceChildren();
  if (!state.kbs.length) {
    list.append(h("li", { class: "muted empty" }, "No knowledge bases yet."));
  }
  for (const kb of state.kbs) {
    const meta = `${kb.ready_documents ?? 0}/${plural(kb.documents ?? 0, "doc")} ready`;
    list.append(
      sidebarItem({
        kind: "kb",
        item: kb,
        title: kb.name,
        meta,
        selected: state.view && state.view.type === "kb" && state.view.id === kb.id,
        onSelect: () => navigate({ type: "kb", id: kb.id }),
        onDelete: () => deleteKb(kb),
      }),
    );
  }
  // The "use knowledge bases" choice in the new-session form.
  const choices = $("#new-session-kb-list");
  const checked = new Set([...choices.querySelectorAll("input:checked")].map((i) => Number(i.value)));
  choices.replaceChildren();
  if (!state.kbs.length) choices.append(h("p", { class: "muted" }, "No knowledge bases yet."));
  for (const kb of state.kbs) {
    const id = `attach-kb-${kb.id}`;
    choices.append(
      h(
        "div",
        { class: "check" },
        h("input", { type: "checkbox", id, value: kb.id, checked: checked.has(kb.id), testid: "attach-kb" }),
        h("label", { for: id, text: kb.name }),
      ),
    );
  }
}

async function loadSessions() {
  const body = await api("api/sessions");
  state.sessions = (body.data || []).slice().sort((a, b) => b.id - a.id);
  renderSessionList();
}

async function loadKbs() {
  const body = await api("api/kbs");
  state.kbs = (body.data || []).slice().sort((a, b) => b.id - a.id);
  renderKbList();
}

async function refreshAll() {
  const results = await Promise.allSettled([loadSessions(), loadKbs()]);
  for (const r of results) if (r.status === "rejected") showError(r.reason, "Loading");
  show(parseHash() || state.view);
}

$("#new-session-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const input = $("#new-session-name");
  const kbIds = [...form.querySelectorAll("#new-session-kb-list input:checked")].map((i) => Number(i.value));
  const body = {};
  if (input.value.trim()) body.name = input.value.trim();
  if (kbIds.length) body.kb_ids = kbIds;
  await withBusy(form, async () => {
    const session = await api("api/sessions", { method: "POST", json: body });
    input.value = "";
    form.querySelectorAll("#new-session-kb-list input:checked").forEach((i) => (i.checked = false));
    state.sessions.unshift(session);
    navigate({ type: "session", id: session.id });
    $("#chat-input").focus();
  }, "Creating the session");
});

$("#new-kb-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const input = $("#new-kb-name");
  const name = input.value.trim();
  if (!name) return;
  await withBusy(form, async () => {
    const kb = await api("api/kbs", { method: "POST", json: { name } });
    input.value = "";
    state.kbs.unshift(kb);
    navigate({ type: "kb", id: kb.id });
  }, "Creating the knowledge base");
});

async function deleteSession(s) {
  if (!confirm(`Delete the session "${sessionTitle(s)}" and all its messages?`)) return;
  try {
    await api(`api/sessions/${s.id}`, { method: "DELETE" });
    const stream = state.chatStreams.get(s.id);
    if (stream) stream.controller.abort();
    state.sessions = state.sessions.filter((x) => x.id !== s.id);
    if (state.view && state.view.type === "session" && state.view.id === s.id) navigate(null);
    else renderSessionList();
  } catch (err) {
    showError(err, "Deleting the session");
  }
}

async function deleteKb(kb) {
  if (!confirm(`Delete the knowledge base "${kb.name}" and all its documents?`)) return;
  try {
    await api(`api/kbs/${kb.id}`, { method: "DELETE" });
    state.kbs = state.kbs.filter((x) => x.id !== kb.id);
    state.answerBoxes.delete(kb.id);
    if (state.view && state.view.type === "kb" && state.view.id === kb.id) navigate(null);
    else renderKbList();
  } catch (err) {
    showError(err, "Deleting the knowledge base");
  }
}

async function withBusy(form, fn, context) {
  const buttons = form.querySelectorAll("button[type=submit]");
  buttons.forEach((b) => (b.disabled = true));
  form.setAttribute("aria-busy", "true");
  try {
    await fn();
  } catch (err) {
    showError(err, context);
  } finally {
    buttons.forEach((b) => (b.disabled = false));
    form.removeAttribute("aria-busy");
  }
}

// ---------- citations and memory trace ----------

function citationName(c) {
  return c.document_name ?? c.source_name ?? (c.document_id != null ? `document ${c.document_id}` : "passage");
}

function renderSources(sources, trace) {
  const box = h("div", { class: "sources", testid: "sources" });
  if (sources && sources.length) {
    box.append(h("div", { class: "sources-title" }, `Sources (${sources.length})`));
    const list = h("ol", { class: "citation-list" });
    sources.forEach((c, i) => {
      const text = c.text ?? c.snippet ?? c.passage ?? "";
      const span = c.char_start != null && c.char_end != null ? `characters ${c.char_start}–${c.char_end}` : "";
      const score = typeof c.score === "number" ? `score ${fmtScore(c.score)}` : "";
      list.append(
        h(
          "li",
          {},
          h(
            "details",
            { class: "citation", testid: "citation", dataset: { documentId: c.document_id ?? "" } },
            h(
              "summary",
              { testid: "citation-toggle" },
              h("span", { class: "cite-num", text: `[${i + 1}]` }),
              h("span", { class: "cite-name", testid: "citation-name", text: citationName(c) }),
              score ? h("span", { class: "cite-score", text: score }) : null,
            ),
            h(
              "div",
              { class: "cite-body" },
              h("blockquote", { class: "cite-text", testid: "citation-text", text: text || "(no text)" }),
              h("div", { class: "muted small" }, [citationName(c), span].filter(Boolean).join(" · ")),
            ),
          ),
        ),
      );
    });
    box.append(list);
  }
  if (trace && trace.length) {
    const items = trace.slice(0, 8).map((t) => {
      const name = t.document_name ?? t.source_name ?? (t.citation && citationName(t.citation)) ?? "memory";
      const share = typeof t.attention === "number" ? `${(t.attention * 100).toFixed(1)}% attention` : "";
      return h(
        "li",
        {},
        h("div", { class: "muted small" }, [name, share].filter(Boolean).join(" · ")),
        h("blockquote", { class: "cite-text", text: t.passage ?? t.text ?? "" }),
      );
    });
    box.append(
      h(
        "details",
        { class: "trace", testid: "memory-trace" },
        h("summary", {}, `Memory trace (${trace.length} block${trace.length === 1 ? "" : "s"} attended)`),
        h("ul", { class: "trace-list" }, items),
      ),
    );
  }
  return box.childElementCount ? box : null;
}

function usageLine(result) {
  const parts = [];
  const u = result && result.usage;
  if (u && u.completion_tokens != null) parts.push(`${u.completion_tokens} tokens`);
  if (result && result.mode) parts.push(`mode ${result.mode}`);
  if (result && result.finish_reason === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

// ---------- chat ----------

const messagesEl = $("#messages");
const chatInput = $("#chat-input");
const chatSend = $("#chat-send");
const chatStop = $("#chat-stop");

function messageBubble(role, content, { streaming = false, createdAt } = {}) {
  const body = h("div", { class: "msg-content", testid: "message-content" });
  body.textContent = content;
  const bubble = h(
    "article",
    {
      class: `msg ${role}`,
      testid: `message-${role}`,
      dataset: { state: streaming ? "streaming" : "done" },
      "aria-busy": streaming ? "true" : false,
    },
    h(
      "div",
      { class: "msg-head" },
      h("span", { class: "msg-role", text: role === "user" ? "You" : role === "assistant" ? "memllm" : role }),
      createdAt ? h("time", { class: "muted small", datetime: createdAt, text: fmtDate(createdAt) }) : null,
    ),
    body,
  );
  return bubble;
}

let historyToken = 0;

async function openSession(id) {
  const session = state.sessions.find((s) => s.id === id);
  $("#chat-title").textContent = sessionTitle(session);
  const kbNames = (session.kb_ids || []).map((k) => (state.kbs.find((x) => x.id === k) || { name: `KB ${k}` }).name);
  $("#chat-meta").textContent = kbNames.length ? `answers from: ${kbNames.join(", ")}` : "";
  $("#chat-export").href = `api/sessions/${id}/export`;
  $("#chat-export").setAttribute("download", `memllm-session-${id}.json`);
  updateChatButtons();
  messagesEl.replaceChildren(h("p", { class: "muted center", testid: "messages-loading" }, "Loading messages…"));
  const token = ++historyToken;
  try {
    const page = await api(`api/sessions/${id}/messages?limit=50`);
    if (token !== historyToken) return;
    messagesEl.replaceChildren();
    renderHistory(id, page, false);
    const live = state.chatStreams.get(id);
    if (live) messagesEl.append(live.userBubble, live.bubble); // an answer still streaming
    if (!messagesEl.querySelector(".msg")) {
      messagesEl.append(h("p", { class: "muted center empty-chat" }, "No messages yet. Say hello!"));
    }
    scrollToEnd(true);
  } catch (err) {
    if (token !== historyToken) return;
    messagesEl.replaceChildren();
    showError(err, "Loading messages");
  }
}

function renderHistory(sessionId, page, prepend) {
  const nodes = (page.data || []).map((m) => messageBubble(m.role, m.content, { createdAt: m.created_at }));
  const first = page.data && page.data[0];
  const anchor = messagesEl.firstChild;
  const oldHeight = messagesEl.scrollHeight;
  if (prepend) {
    const fragment = document.createDocumentFragment();
    fragment.append(...nodes);
    messagesEl.insertBefore(fragment, anchor);
  } else {
    messagesEl.append(...nodes);
  }
  messagesEl.querySelector(".load-earlier")?.remove();
  if (page.has_more && first) {
    const btn = h("button", {
      type: "button",
      class: "btn ghost load-earlier",
      testid: "load-earlier",
      text: "Load earlier messages",
      onclick: async () => {
        btn.disabled = true;
        try {
          const more = await api(`api/sessions/${sessionId}/messages?limit=50&before=${first.id}`);
          btn.remove();
          renderHistory(sessionId, more, true);
        } catch (err) {
          btn.disabled = false;
          showError(err, "Loading earlier messages");
        }
      },
    });
    messagesEl.insertBefore(btn, messagesEl.firstChild);
  }
  if (prepend) messagesEl.scrollTop += messagesEl.scrollHeight - oldHeight;
}

function scrollToEnd(force = false) {
  const nearEnd = messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 120;
  if (force || nearEnd) messagesEl.scrollTop = messagesEl.scrollHeight;
}

function updateChatButtons() {
  const id = state.view && state.view.type === "session" ? state.view.id : null;
  const busy = id !== null && state.chatStreams.has(id);
  chatSend.disabled = busy;
  chatStop.hidden = !busy;
}

chatInput.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("#chat-form").requestSubmit();
  }
});

chatStop.addEventListener("click", () => {
  const id = state.view && state.view.id;
  const live = state.chatStreams.get(id);
  if (live) live.controller.abort();
});

$("#chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!state.view || state.view.type !== "session") return;
  const sessionId = state.view.id;
  const content = chatInput.value.trim();
  if (!content || state.chatStreams.has(sessionId)) return;
  chatInput.value = "";
  messagesEl.querySelector(".empty-chat")?.remove();

  const userBubble = messageBubble("user", content, { createdAt: new Date().toISOString() });
  const bubble = messageBubble("assistant", "", { streaming: true });
  const contentEl = bubble.querySelector(".msg-content");
  contentEl.append(h("span", { class: "typing", "aria-label": "writing" }, h("i"), h("i"), h("i")));
  messagesEl.append(userBubble, bubble);
  scrollToEnd(true);

  const controller = new AbortController();
  state.chatStreams.set(sessionId, { controller, bubble, userBubble });
  updateChatButtons();
  let text = "";
  try {
    const result = await streamPost(
      `api/sessions/${sessionId}/messages`,
      { content, ...generationOptions() },
      {
        signal: controller.signal,
        onDelta: (piece) => {
          text += piece;
          contentEl.textContent = text;
          scrollToEnd();
        },
      },
    );
    const final = result.message && typeof result.message.content === "string" ? result.message.content : text;
    contentEl.textContent = final || "(empty answer)";
    const sources = renderSources(result.sources, result.memory_trace);
    if (sources) bubble.append(sources);
    const usage = usageLine(result);
    if (usage) bubble.append(h("div", { class: "msg-foot muted small", testid: "message-usage", text: usage }));
    bubble.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      contentEl.textContent = text;
      bubble.append(h("div", { class: "msg-foot muted small", text: "stopped" }));
      bubble.dataset.state = "stopped";
    } else {
      contentEl.textContent = text;
      bubble.append(h("div", { class: "msg-error", testid: "message-error", role: "alert", text: err.message }));
      bubble.dataset.state = "error";
      if (!text && !chatInput.value && state.view && state.view.id === sessionId) chatInput.value = content;
      showError(err, "Sending the message");
    }
  } finally {
    bubble.removeAttribute("aria-busy");
    state.chatStreams.delete(sessionId);
    updateChatButtons();
    scrollToEnd();
    const s = state.sessions.find((x) => x.id === sessionId);
    if (s) {
      // Refresh the message count in the sidebar.
      api(`api/sessions/${sessionId}`)
        .then((fresh) => {
          Object.assign(s, fresh);
          renderSessionList();
        })
        .catch(() => {});
    }
  }
});

// ---------- knowledge bases ----------

const docList = $("#doc-list");

function answersBox(kbId) {
  let box = state.answerBoxes.get(kbId);
  if (!box) {
    box = h("div", { class: "answer-stack" });
    state.answerBoxes.set(kbId, box);
  }
  return box;
}

function renderKbHeader(kb) {
  $("#kb-title").textContent = kb.name;
  $("#kb-meta").textContent =
    `${kb.ready_documents ?? 0} of ${plural(kb.documents ?? 0, "document")} ready` +
    (kb.tokens ? ` · ${Number(kb.tokens).toLocaleString()} tokens` : "");
  $("#kb-description").textContent = kb.description || "";
}

function updateAskButtons() {
  const id = state.view && state.view.type === "kb" ? state.view.id : null;
  const busy = id !== null && state.askStreams.has(id);
  $("#ask-send").disabled = busy;
  $("#ask-stop").hidden = !busy;
}

function openKb(id) {
  const kb = state.kbs.find((k) => k.id === id);
  renderKbHeader(kb);
  $("#answers").replaceChildren(answersBox(id));
  updateAskButtons();
  docList.replaceChildren(h("li", { class: "muted" }, "Loading documents…"));
  pollDocuments(id, true);
}

function stopPolling() {
  clearTimeout(state.pollTimer);
  state.pollTimer = null;
  state.pollKb = null;
}

async function pollDocuments(kbId, first = false) {
  clearTimeout(state.pollTimer);
  state.pollKb = kbId;
  let pending = false;
  try {
    const [docs, kb] = await Promise.all([api(`api/kbs/${kbId}/documents`), api(`api/kbs/${kbId}`)]);
    if (state.pollKb !== kbId) return;
    const index = state.kbs.findIndex((k) => k.id === kbId);
    if (index >= 0) state.kbs[index] = kb;
    renderKbHeader(kb);
    renderKbList();
    renderDocs(kbId, docs.data || []);
    pending = (docs.data || []).some((d) => d.status !== "ready" && d.status !== "error");
  } catch (err) {
    if (state.pollKb !== kbId) return;
    if (first) docList.replaceChildren();
    showError(err, "Loading documents");
    pending = true; // try again (slower) in case the server was busy
  }
  if (pending && state.pollKb === kbId) {
    state.pollTimer = setTimeout(() => pollDocuments(kbId), first ? 500 : 1000);
  }
}

const STATUS_LABEL = {
  pending: "queued",
  parsing: "reading…",
  encoding: "reading…",
  ready: "ready",
  error: "error",
};

function renderDocs(kbId, docs) {
  const openViews = new Set([...docList.querySelectorAll("details[open]")].map((d) => d.dataset.docId));
  docList.replaceChildren();
  if (!docs.length) {
    docList.append(h("li", { class: "muted" }, "No documents yet. Upload a file or paste some text."));
    return;
  }
  for (const d of docs.slice().sort((a, b) => b.id - a.id)) {
    const badge = h("span", {
      class: `badge status-${d.status}`,
      testid: "doc-status",
      dataset: { status: d.status },
      text: STATUS_LABEL[d.status] || d.status,
    });
    const view = h(
      "details",
      { class: "doc-view", dataset: { docId: String(d.id) } },
      h("summary", {}, "View text"),
      h("pre", { class: "doc-text" }, "Loading…"),
    );
    view.addEventListener("toggle", async () => {
      if (!view.open || view.dataset.loaded) return;
      try {
        const full = await api(`api/kbs/${kbId}/documents/${d.id}?include_text=true`);
        view.querySelector("pre").textContent = full.text ?? "(no text)";
        view.dataset.loaded = "1";
      } catch (err) {
        view.querySelector("pre").textContent = "";
        showError(err, "Loading the document text");
      }
    });
    if (openViews.has(String(d.id))) view.open = true;
    docList.append(
      h(
        "li",
        { class: "doc", testid: "doc-item", dataset: { id: d.id, status: d.status } },
        h(
          "div",
          { class: "doc-row" },
          h("span", { class: "doc-name", testid: "doc-name", text: d.name, title: d.name }),
          badge,
          h("span", { class: "muted small" }, d.tokens ? `${Number(d.tokens).toLocaleString()} tokens` : ""),
          h("button", {
            type: "button",
            class: "icon-btn delete",
            "aria-label": `Delete ${d.name}`,
            title: "Delete",
            testid: "doc-delete",
            onclick: () => deleteDocument(kbId, d),
          }, trashIcon()),
        ),
        d.status === "error" && d.error ? h("div", { class: "msg-error", testid: "doc-error", text: d.error }) : null,
        d.status === "error" && d.retryable
          ? h("button", {
              type: "button",
              class: "retry-btn",
              testid: "doc-retry",
              title: "Read this document again from its kept text",
              onclick: (event) => retryDocument(kbId, d, event.currentTarget),
            }, "Retry")
          : null,
        d.status === "ready" ? view : null,
      ),
    );
  }
}

async function retryDocument(kbId, d, button) {
  button.disabled = true;
  try {
    await api(`api/kbs/${kbId}/documents/${d.id}/retry`, { method: "POST" });
  } catch (err) {
    showError(err, `Retrying ${d.name}`);
  }
  if (state.view && state.view.type === "kb" && state.view.id === kbId) pollDocuments(kbId);
}

async function deleteDocument(kbId, d) {
  if (!confirm(`Delete the document "${d.name}"?`)) return;
  try {
    await api(`api/kbs/${kbId}/documents/${d.id}`, { method: "DELETE" });
    if (state.view && state.view.type === "kb" && state.view.id === kbId) pollDocuments(kbId);
  } catch (err) {
    showError(err, "Deleting the document");
  }
}

$("#upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!state.view || state.view.type !== "kb") return;
  const kbId = state.view.id;
  const input = $("#upload-file");
  const files = [...input.files];
  if (!files.length) {
    showError(new Error("choose a file first"), "Upload");
    return;
  }
  await withBusy(event.currentTarget, async () => {
    for (const file of files) {
      const form = new FormData();
      form.append("file", file, file.name);
      form.append("name", file.name);
      try {
        await api(`api/kbs/${kbId}/documents`, { method: "POST", form });
      } catch (err) {
        showError(err, `Uploading ${file.name}`);
      }
    }
    input.value = "";
    if (state.view && state.view.id === kbId && state.view.type === "kb") pollDocuments(kbId);
  }, "Upload");
});

$("#paste-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!state.view || state.view.type !== "kb") return;
  const kbId = state.view.id;
  const name = $("#paste-name").value.trim();
  const text = $("#paste-text").value;
  if (!name || !text.trim()) return;
  await withBusy(event.currentTarget, async () => {
    await api(`api/kbs/${kbId}/documents`, { method: "POST", json: { name, text } });
    $("#paste-name").value = "";
    $("#paste-text").value = "";
    if (state.view && state.view.id === kbId && state.view.type === "kb") pollDocuments(kbId);
  }, "Adding the text");
});

const askInput = $("#ask-input");
askInput.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("#ask-form").requestSubmit();
  }
});

$("#ask-stop").addEventListener("click", () => {
  const controller = state.view && state.askStreams.get(state.view.id);
  if (controller) controller.abort();
});

$("#ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!state.view || state.view.type !== "kb") return;
  const kbId = state.view.id;
  const question = askInput.value.trim();
  if (!question || state.askStreams.has(kbId)) return;
  askInput.value = "";

  const contentEl = h("div", { class: "msg-content", testid: "answer-text" });
  contentEl.append(h("span", { class: "typing", "aria-label": "writing" }, h("i"), h("i"), h("i")));
  const card = h(
    "article",
    { class: "msg assistant answer", testid: "answer", dataset: { state: "streaming" }, "aria-busy": "true" },
    h("div", { class: "question", testid: "answer-question" }, h("span", { class: "msg-role" }, "Q"), question),
    contentEl,
  );
  answersBox(kbId).prepend(card);

  const controller = new AbortController();
  state.askStreams.set(kbId, controller);
  updateAskButtons();
  let text = "";
  try {
    const result = await streamPost(
      `api/kbs/${kbId}/query`,
      { question, mode: settingInputs.queryMode.value || "hybrid", ...generationOptions() },
      {
        signal: controller.signal,
        onDelta: (piece) => {
          text += piece;
          contentEl.textContent = text;
        },
      },
    );
    contentEl.textContent = (typeof result.answer === "string" ? result.answer : text) || "(empty answer)";
    const sources = renderSources(result.sources, result.memory_trace);
    if (sources) card.append(sources);
    else card.append(h("div", { class: "muted small", text: "No sources were cited." }));
    const usage = usageLine(result);
    if (usage) card.append(h("div", { class: "msg-foot muted small", text: usage }));
    card.dataset.state = "done";
  } catch (err) {
    contentEl.textContent = text;
    if (err.name === "AbortError") {
      card.append(h("div", { class: "msg-foot muted small", text: "stopped" }));
      card.dataset.state = "stopped";
    } else {
      card.append(h("div", { class: "msg-error", testid: "answer-error", role: "alert", text: err.message }));
      card.dataset.state = "error";
      showError(err, "Asking the knowledge base");
    }
  } finally {
    card.removeAttribute("aria-busy");
    state.askStreams.delete(kbId);
    updateAskButtons();
  }
});

// ---------- start ----------

checkHealth();
refreshAll();
