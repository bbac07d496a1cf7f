// The gateway's chat page: streamed answers from /v1/chat/completions, the models panel from
// /v1/models and /v1/models/{name}/versions, and "Use as default" through /admin/models/{name}/load.
// Keys live in this script's memory only (never in storage). Model output is rendered as Markdown
// by the vendored marked, configured so that it can never become markup (see renderMarkdown).
"use strict";

const state = { apiKey: "", adminKey: "", history: [], controller: null, models: [] };
const $ = (id) => document.getElementById(id);

const FACTS = [
  ["fact_accuracy_en_after", "Fact accuracy (en)"],
  ["fact_accuracy_zh_after", "Fact accuracy (zh)"],
  ["retention_after", "Retention"],
  ["bleu4_after", "BLEU-4"],
  ["rouge_l_after", "ROUGE-L"],
];

// ---------------------------------------------------------------- Markdown, safely

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                                   "'": "&#39;" })[c]);
}

function safeHref(href) {
  try {
    const url = new URL(href, window.location.href);
    return ["http:", "https:", "mailto:"].includes(url.protocol) ? url.href : null;
  } catch (e) {
    return null;
  }
}

const markdown = new marked.Marked({
  gfm: true,
  breaks: true,
  renderer: {
    // Raw HTML in model output is shown as text, never parsed as markup.
    html(token) { return escapeHtml(token.text); },
    link(token) {
      const label = this.parser.parseInline(token.tokens);
      const href = safeHref(token.href);
      if (href === null) return label;
      return `<a href="${escapeHtml(href)}" rel="noopener noreferrer nofollow" target="_blank">${label}</a>`;
    },
    // No image is fetched on the model's say-so: it becomes a link.
    image(token) {
      const href = safeHref(token.href);
      const label = escapeHtml(token.text || token.href);
      return href === null ? label : `<a href="${escapeHtml(href)}" rel="noopener noreferrer nofollow">${label}</a>`;
    },
  },
});

function renderMarkdown(text) {
  return markdown.parse(text);
}

// ---------------------------------------------------------------- the API

function headers(key) {
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON: keep the status text */ }
  return `${response.status}: ${message}`;
}

async function api(path, options = {}, key = state.apiKey) {
  const response = await fetch(path, { ...options, headers: headers(key) });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text) { $("status").textContent = text; }

// ---------------------------------------------------------------- the conversation

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  const meta = document.createElement("div");
  meta.className = "meta";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy";
  copy.addEventListener("click", () => copyText(item.dataset.text || "", copy));
  item.append(label, copy, content, meta);
  setContent(item, text);
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function setContent(item, text) {
  item.dataset.text = text;
  const content = item.querySelector(".content");
  if (item.classList.contains("assistant")) content.innerHTML = renderMarkdown(text);
  else content.textContent = text;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard API (e.g. not a secure context): the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1200);
}

function numberSetting(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { model: $("model").value || undefined, messages, stream: true,
                 stream_options: { include_usage: true } };
  for (const [key, id] of [["temperature", "temperature"], ["top_p", "top-p"], ["max_tokens", "max-tokens"]]) {
    const value = numberSetting(id);
    if (value !== undefined) body[key] = value;
  }
  return body;
}

// Yields the parsed JSON of each "data:" event of an OpenAI SSE body until [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;  // ": ping" comments
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  showError("");
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const item = addMessage("assistant", "");
  item.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let answer = "";
  let pending = false;
  const draw = () => { pending = false; setContent(item, answer); item.scrollIntoView({ block: "end" }); };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(state.apiKey), body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message || "the answer failed");
      for (const choice of chunk.choices || []) {
        answer += (choice.delta && choice.delta.content) || "";
        if (choice.finish_reason) item.dataset.finish = choice.finish_reason;
      }
      if (chunk.model) item.dataset.model = chunk.model;
      if (chunk.usage) item.querySelector(".meta").textContent =
        `${chunk.model}: ${chunk.usage.completion_tokens} tokens, finish ${item.dataset.finish || "?"}`;
      if (!pending) { pending = true; requestAnimationFrame(draw); }
    }
    state.history.push({ role: "assistant", content: answer });
  } catch (err) {
    if (err.name === "AbortError") {
      item.querySelector(".meta").textContent = "stopped";
      if (answer) state.history.push({ role: "assistant", content: answer });
    } else {
      state.history.pop();  // the failed question leaves the conversation as it was
      item.remove();
      showError(err.message);
    }
  } finally {
    draw();
    item.classList.remove("streaming");
    item.dataset.done = "true";
    state.controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  setStatus(busy ? "answering…" : "");
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  showError("");
}

// ---------------------------------------------------------------- models and versions

function percent(value) { return typeof value === "number" ? `${(value * 100).toFixed(1)} %` : "–"; }
function score(value) { return typeof value === "number" ? value.toFixed(3) : "–"; }

function versionBlock(model, card) {
  const block = document.createElement("div");
  block.className = "version";
  block.dataset.model = model;
  block.dataset.version = String(card.version);
  const title = document.createElement("div");
  title.textContent = `version ${card.version} · built ${card.built_at}`;
  if (card.serving) title.insertAdjacentHTML("beforeend", '<span class="badge">serving</span>');
  if (card.default) title.insertAdjacentHTML("beforeend", '<span class="badge default">default</span>');
  const base = document.createElement("div");
  base.className = "hint";
  base.textContent = `base: ${card.base_model || "?"}; precisions: ${(card.precisions || []).join(", ")}`;
  const table = document.createElement("table");
  const metrics = (card.build && card.build.metrics) || {};
  for (const [key, label] of FACTS) {
    const row = table.insertRow();
    row.insertCell().textContent = label;
    const value = metrics[key];
    row.insertCell().textContent = key.startsWith("bleu") || key.startsWith("rouge") ? score(value) : percent(value);
    row.dataset.fact = key;
  }
  const gates = (card.build && card.build.gates) || [];
  const gateLine = document.createElement("div");
  gateLine.className = "gates";
  const failed = gates.filter((g) => !g.passed);
  gateLine.textContent = gates.length
    ? `fidelity gates: ${gates.length - failed.length}/${gates.length} passed` +
      (failed.length ? ` (failed: ${failed.map((g) => `${g.stage}/${g.name}`).join(", ")})` : "")
    : "fidelity gates: not recorded";
  if (failed.length) gateLine.classList.add("gate-fail");
  gateLine.title = gates.map((g) => `${g.stage}/${g.name}: ${g.passed ? "passed" : "FAILED"} ` +
    `(${g.value ?? "–"} vs ${g.threshold ?? "–"})`).join("\n");
  block.append(title, base, table, gateLine);
  if (!card.default) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "use-default";
    button.textContent = "Use as default";
    button.hidden = !state.adminKey;
    button.addEventListener("click", () => useAsDefault(model, card.version, button));
    block.append(button);
  }
  return block;
}

async function loadModels() {
  try {
    const list = await api("/v1/models");
    state.models = list.data;
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren(...list.data.map((m) => new Option(`${m.id} (v${m.version})${m.default ? " ★" : ""}`, m.id)));
    const fallback = list.data.find((m) => m.default) || list.data[0];
    select.value = list.data.some((m) => m.id === chosen) ? chosen : (fallback ? fallback.id : "");
    const panel = $("models-panel");
    const cards = [];
    for (const model of list.data) {
      const versions = await api(`/v1/models/${encodeURIComponent(model.id)}/versions`);
      const card = document.createElement("div");
      card.className = "model-card";
      card.dataset.model = model.id;
      const heading = document.createElement("h3");
      heading.textContent = `${model.id} · context ${model.context_length}${model.ready ? "" : " · not ready"}`;
      // Newest first: a build just written is at the top, beside its "Use as default".
      card.append(heading, ...versions.data.slice().reverse().map((v) => versionBlock(model.id, v)));
      cards.push(card);
    }
    panel.replaceChildren(...cards);
    showError("");
  } catch (err) {
    showError(err.message);
  }
}

async function useAsDefault(model, version, button) {
  button.disabled = true;
  try {
    const result = await api(`/admin/models/${encodeURIComponent(model)}/load`, {
      method: "POST", body: JSON.stringify({ version, make_default: true }),
    }, state.adminKey);
    setStatus(`${result.model} version ${result.version} is the default now`);
    await loadModels();
  } catch (err) {
    showError(err.message);
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- wiring

function init() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("refresh-models").addEventListener("click", loadModels);
  $("api-key").addEventListener("change", (event) => { state.apiKey = event.target.value.trim(); loadModels(); });
  $("admin-key").addEventListener("input", (event) => {
    state.adminKey = event.target.value.trim();
    for (const button of document.querySelectorAll(".use-default")) button.hidden = !state.adminKey;
  });
  loadModels();
}

window.renderMarkdown = renderMarkdown;  // for the page's tests
document.addEventListener("DOMContentLoaded", init);
