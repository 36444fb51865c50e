// heron's chat page: talks to this server's own OpenAI-compatible API. The conversation,
// settings and API key live in this browser's localStorage only.
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const KEYS = { key: "heron.apiKey", chat: "heron.conversation", settings: "heron.settings" };
const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "stop", "extra"];

const state = { model: null, messages: [], controller: null, views: [] };

const store = {
  get(name, fallback) {
    try {
      const value = localStorage.getItem(name);
      return value === null ? fallback : JSON.parse(value);
    } catch {
      return fallback;
    }
  },
  set(name, value) {
    try {
      if (value === null) localStorage.removeItem(name);
      else localStorage.setItem(name, JSON.stringify(value));
    } catch { /* storage full or disabled: the page still works, it just forgets */ }
  },
};

class AuthError extends Error {}

// ---- the server ----------------------------------------------------------------------------

function headers() {
  const key = store.get(KEYS.key, "");
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: headers() });
  if (response.status === 401) {
    const reason = await errorMessage(response);
    askKey(reason);
    throw new AuthError(reason);
  }
  return response;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body);
  } catch {
    return `HTTP ${response.status}`;
  }
}

function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

async function connect() {
  for (;;) {
    let response;
    try {
      response = await api("v1/models");
    } catch (err) {
      if (err instanceof AuthError) return;
      setStatus("cannot reach the server; retrying…", "error");
      await sleep(2000);
      continue;
    }
    if (response.status === 503) {
      setStatus("loading the model…", "busy");
      await sleep(1000);
      continue;
    }
    if (!response.ok) {
      setStatus(await errorMessage(response), "error");
      return;
    }
    const card = (await response.json()).data[0];
    state.model = card.id;
    $("model").textContent = `${card.id} · context ${card.max_model_len ?? "?"} tokens`;
    setStatus("ready", "ok");
    return;
  }
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

// ---- API key -------------------------------------------------------------------------------

function askKey(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason || "This server needs an API key.";
  $("key-input").value = store.get(KEYS.key, "");
  setStatus("API key needed", "error");
  if (!dialog.open) dialog.showModal();
}

function onKeyDialogClose() {
  const choice = $("key-dialog").returnValue;
  if (choice === "save") store.set(KEYS.key, $("key-input").value.trim() || null);
  if (choice === "forget") store.set(KEYS.key, null);
  $("key-input").value = "";
  if (choice === "save" || choice === "forget") connect();
}

// ---- settings ------------------------------------------------------------------------------

function loadSettings() {
  const saved = store.get(KEYS.settings, {});
  for (const name of SETTINGS) {
    if (typeof saved[name] === "string") $(name).value = saved[name];
    $(name).addEventListener("change", saveSettings);
  }
}

function saveSettings() {
  store.set(KEYS.settings, Object.fromEntries(SETTINGS.map((name) => [name, $(name).value])));
}

function number(name) {
  const value = $(name).value.trim();
  return value === "" ? undefined : Number(value);
}

/** The request body for the conversation so far (throws on bad "extra" JSON). */
function requestBody(history) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of history) messages.push({ role: m.role, content: m.content });
  const stop = $("stop").value.split(",").map((s) => s.trim().replace(/\\n/g, "\n")
    .replace(/\\t/g, "\t")).filter(Boolean);
  const extraText = $("extra").value.trim();
  let extra = {};
  if (extraText) {
    extra = JSON.parse(extraText);
    if (typeof extra !== "object" || extra === null || Array.isArray(extra)) {
      throw new SyntaxError("extra request fields must be a JSON object");
    }
  }
  return {
    model: state.model, temperature: number("temperature"), top_p: number("top_p"),
    max_tokens: number("max_tokens"), ...(stop.length ? { stop } : {}), ...extra,
    messages, stream: true, stream_options: { include_usage: true },
  };
}

// ---- generating ----------------------------------------------------------------------------

async function generate() {
  const history = state.messages.slice();
  const answer = { role: "assistant", content: "", state: "streaming" };
  let body;
  try {
    body = requestBody(history);
  } catch (err) {
    setStatus(`settings: ${err.message}`, "error");
    return;
  }
  state.messages.push(answer);
  render();
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const timing = { start: performance.now(), first: null, end: null };
  try {
    await stream(body, answer, timing, controller.signal);
    answer.state = "done";
  } catch (err) {
    answer.state = controller.signal.aborted ? "stopped" : "error";
    if (!controller.signal.aborted) answer.error = err.message;
  } finally {
    timing.end = performance.now();
    answer.stats = { ...answer.stats, ...speed(answer, timing) };
    state.controller = null;
    setBusy(false);
    render();
    save();
  }
}

async function stream(body, answer, timing, signal) {
  const response = await fetch("v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (response.status === 401) askKey(await errorMessage(response));
  if (!response.ok) throw new Error(await errorMessage(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      if (onEvent(event, answer, timing)) return;
    }
  }
}

/** Apply one SSE event to the answer; true at [DONE]. */
function onEvent(event, answer, timing) {
  const data = event.split("\n").filter((l) => l.startsWith("data:"))
    .map((l) => l.slice(5).trim()).join("\n");
  if (!data) return false;
  if (data === "[DONE]") return true;
  const chunk = JSON.parse(data);
  if (chunk.error) throw new Error(chunk.error.message || "error");
  const choice = chunk.choices?.[0];
  const thought = choice?.delta?.reasoning_content ?? choice?.delta?.reasoning;
  if (thought) {  // a thinking model's reasoning (--reasoning-parser), before its answer
    timing.first ??= performance.now();
    answer.reasoning = (answer.reasoning || "") + thought;
    scheduleRender();
  }
  const text = choice?.delta?.content;
  if (text) {
    timing.first ??= performance.now();
    answer.content += text;
    scheduleRender();
  }
  if (choice?.finish_reason) answer.stats = { ...answer.stats, finish: choice.finish_reason };
  if (chunk.usage) answer.stats = { ...answer.stats, tokens: chunk.usage.completion_tokens };
  return false;
}

function speed(answer, timing) {
  const out = { seconds: (timing.end - timing.start) / 1000 };
  if (timing.first !== null) out.ttft_ms = timing.first - timing.start;
  const tokens = answer.stats?.tokens;
  if (tokens > 1 && timing.first !== null && timing.end > timing.first) {
    out.tok_s = (tokens - 1) / ((timing.end - timing.first) / 1000);
  }
  return out;
}

function stop() {
  if (state.controller) state.controller.abort();
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop-button").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

// ---- the conversation ----------------------------------------------------------------------

let renderPending = false;

function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    render();
  });
}

function save() {
  store.set(KEYS.chat, state.messages.map(({ role, content, reasoning, state: s, stats, error }) =>
    ({ role, content, reasoning, state: s, stats, error })));
}

/** Bring the message list in line with state.messages (only changed messages are rebuilt). */
function render() {
  const list = $("messages");
  const follow = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  state.messages.forEach((message, index) => {
    const key = `${message.content.length}|${(message.reasoning || "").length}|${message.state}`
      + `|${JSON.stringify(message.stats)}`
      + `|${index === state.messages.length - 1}`;
    const view = state.views[index];
    if (view && view.message === message && view.key === key) return;
    const node = messageNode(message, index);
    if (view) view.node.replaceWith(node);
    else list.appendChild(node);
    state.views[index] = { message, key, node };
  });
  for (const stale of state.views.splice(state.messages.length)) stale.node.remove();
  if (follow) list.scrollTop = list.scrollHeight;
}

function messageNode(message, index) {
  const node = document.createElement("article");
  node.className = `message ${message.role}`;
  node.dataset.state = message.state || "done";
  if (message.role === "assistant" && message.reasoning) node.appendChild(reasoningNode(message));
  const content = document.createElement("div");
  content.className = "content";
  if (message.role === "assistant") content.appendChild(renderMarkdown(message.content));
  else content.textContent = message.content;
  node.appendChild(content);
  if (message.error) {
    const error = document.createElement("p");
    error.className = "error";
    error.textContent = message.error;
    node.appendChild(error);
  }
  if (message.role === "assistant" && message.state !== "streaming") {
    node.appendChild(footer(message, index));
  }
  return node;
}

/** The model's reasoning as plain text, folded away once the answer has begun. */
function reasoningNode(message) {
  const details = document.createElement("details");
  details.className = "reasoning";
  const unfolded = message.state === "streaming" && !message.content;  // while it thinks
  details.open = message.showReasoning ?? unfolded;
  details.addEventListener("toggle", () => {  // the user's choice (not the open set here)
    if (details.open !== unfolded) message.showReasoning = details.open;
  });
  const summary = document.createElement("summary");
  summary.textContent = "Thinking";
  const text = document.createElement("div");
  text.textContent = message.reasoning;
  details.append(summary, text);
  return details;
}

function footer(message, index) {
  const bar = document.createElement("footer");
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.textContent = statsText(message);
  bar.appendChild(stats);
  bar.appendChild(button("Copy", () => copy(message.content)));
  if (index === state.messages.length - 1) bar.appendChild(button("Regenerate", regenerate));
  return bar;
}

function statsText(message) {
  const s = message.stats || {};
  const parts = [];
  if (message.state === "stopped") parts.push("stopped");
  if (s.tokens !== undefined) parts.push(`${s.tokens} tokens`);
  if (s.tok_s !== undefined) parts.push(`${s.tok_s.toFixed(1)} tok/s`);
  if (s.ttft_ms !== undefined) parts.push(`first token ${Math.round(s.ttft_ms)} ms`);
  if (s.seconds !== undefined) parts.push(`${s.seconds.toFixed(2)} s`);
  if (s.finish) parts.push(`finish: ${s.finish}`);
  return parts.join(" · ");
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = label.toLowerCase();
  b.addEventListener("click", onClick);
  return b;
}

async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {  // not a secure context: the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  setStatus("copied", "ok");
}

function regenerate() {
  if (state.controller) return;
  if (state.messages.at(-1)?.role === "assistant") state.messages.pop();
  render();
  generate();
}

function onSubmit(event) {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  if (!state.model) {
    setStatus("not connected to a model yet", "error");
    return;
  }
  $("input").value = "";
  state.messages.push({ role: "user", content: text });
  render();
  save();
  generate();
}

function newChat() {
  stop();
  state.messages = [];
  render();
  save();
}

function init() {
  state.messages = store.get(KEYS.chat, []).filter((m) => m && typeof m.content === "string")
    .map((m) => (m.state === "streaming" ? { ...m, state: "stopped" } : m));
  loadSettings();
  render();
  $("composer").addEventListener("submit", onSubmit);
  $("input").addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || e.shiftKey || e.isComposing) return;
    e.preventDefault();
    $("composer").requestSubmit();
  });
  $("stop-button").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("key-button").addEventListener("click", () => askKey("API key for this server"));
  $("key-dialog").addEventListener("close", onKeyDialogClose);
  $("settings-toggle").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  });
  connect();
}

init();
