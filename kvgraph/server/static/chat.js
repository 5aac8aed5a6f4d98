// kvgraph chat page: talks to this server's /v1 API (streamed chat completions), keeps the conversation and
// the settings in localStorage. Model output is only ever put in the page as text (textContent / text
// nodes), never as HTML.
"use strict";

(() => {
  const STORE = { messages: "kvgraph.chat.messages", settings: "kvgraph.chat.settings", apiKey: "kvgraph.chat.apiKey" };
  // form field id -> settings key (values kept as the strings typed; empty: the server's default)
  const FIELDS = { "temperature": "temperature", "top-p": "top_p", "max-tokens": "max_tokens", "seed": "seed",
                   "system-prompt": "system", "extra-json": "extra" };
  const $ = (id) => document.getElementById(id);

  function rawGet(key) {                            // null where storage is blocked (it throws there)
    try {
      return localStorage.getItem(key);
    } catch (e) {
      return null;
    }
  }

  function load(key, fallback) {
    try {
      const raw = rawGet(key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch (e) {
      return fallback;
    }
  }

  function store(key, value) {
    try {
      localStorage.setItem(key, typeof value === "string" ? value : JSON.stringify(value));
    } catch (e) {
      showError(`Could not save in this browser's storage: ${e.message}`);
    }
  }

  let messages = load(STORE.messages, []);          // [{role, content, note?, stats?}]
  if (!Array.isArray(messages)) messages = [];
  messages = messages.filter((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string");
  let settings = load(STORE.settings, {});
  if (typeof settings !== "object" || settings === null) settings = {};
  let apiKey = rawGet(STORE.apiKey) || "";
  let modelName = null;
  let controller = null;                            // the AbortController of the reply being streamed

  // ---- errors and the API key ----------------------------------------------------------------------------

  function showError(text) {
    const box = $("error");
    box.textContent = text;
    box.hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function askForKey(text) {
    $("api-key-message").textContent = text || (apiKey
      ? "The server refused this API key (401 Unauthorized). Enter the right one:"
      : "This server requires an API key (401 Unauthorized). Enter it:");
    $("api-key").value = apiKey;
    $("api-key-panel").hidden = false;
    $("api-key").focus();
  }

  function headers(json) {
    const h = json ? { "Content-Type": "application/json" } : {};
    if (apiKey) h["Authorization"] = `Bearer ${apiKey}`;
    return h;
  }

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // An error response as a message: the server's OpenAI-style {"error": {"message"}} when it sent one.
  async function httpError(res) {
    let detail = res.statusText || "";
    try {
      const text = await res.text();
      try {
        const body = JSON.parse(text);
        detail = (body && body.error && body.error.message) || (body && body.detail) || text;
        if (typeof detail !== "string") detail = JSON.stringify(detail);
      } catch (e) {
        detail = text || detail;
      }
    } catch (e) { /* no body */ }
    if (res.status === 401) {
      const what = apiKey ? "The server refused this API key (401 Unauthorized)."
                          : "This server requires an API key (401 Unauthorized).";
      return new HttpError(401, `${what} Enter the key in the box at the top, then send again.` +
                                (detail ? `\nServer: ${detail}` : ""));
    }
    return new HttpError(res.status, `Server error ${res.status}: ${detail}`);
  }

  // ---- the model name ------------------------------------------------------------------------------------

  async function fetchModel() {
    const label = $("model-name");
    try {
      const res = await fetch("v1/models", { headers: headers(false) });
      if (!res.ok) {
        const err = await httpError(res);
        label.textContent = "model: ?";
        if (err.status === 401) askForKey();
        else showError(err.message);
        return false;
      }
      const body = await res.json();
      modelName = body.data && body.data.length ? body.data[0].id : null;
      label.textContent = modelName || "model: ?";
      document.title = modelName ? `${modelName} · kvgraph chat` : "kvgraph chat";
      $("api-key-panel").hidden = true;
      renderEmptyNote();
      return true;
    } catch (e) {
      label.textContent = "model: ?";
      showError(`Cannot reach the server: ${e.message}`);
      return false;
    }
  }

  // ---- rendering (text only) -----------------------------------------------------------------------------

  // Text with ``` fenced blocks shown as <pre>; everything goes in as text nodes.
  function renderContent(el, text) {
    const parts = text.split("```");
    const nodes = [];
    parts.forEach((part, i) => {
      if (i % 2 === 0) {
        if (part) nodes.push(document.createTextNode(part));
      } else {
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        const nl = part.indexOf("\n");
        // the fence's first line names the language (```python); the code starts after it
        code.textContent = nl >= 0 && /^[\w+.-]*$/.test(part.slice(0, nl).trim()) ? part.slice(nl + 1) : part;
        pre.appendChild(code);
        nodes.push(pre);
      }
    });
    el.replaceChildren(...nodes);
  }

  function messageElement(m) {
    const el = document.createElement("div");
    el.className = `msg ${m.role}`;
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = m.role === "user" ? "You" : "Assistant";
    const content = document.createElement("div");
    content.className = "content";
    renderContent(content, m.content);
    const note = document.createElement("span");
    note.className = "note";
    el.append(role, content, note);
    setNote(el, m);
    return el;
  }

  function setNote(el, m) {
    const note = el.querySelector(".note");
    note.textContent = [m.note, m.stats].filter(Boolean).join(" · ");
    note.hidden = !note.textContent;
    if (m.note) el.dataset.note = m.note;
  }

  function renderEmptyNote() {
    const box = $("messages");
    const empty = box.querySelector(".empty");
    if (messages.length) {
      if (empty) empty.remove();
      return;
    }
    const p = empty || document.createElement("p");
    p.className = "empty";
    p.textContent = modelName ? `Start a conversation with ${modelName}.` : "Start a conversation.";
    if (!empty) box.appendChild(p);
  }

  function renderAll() {
    const box = $("messages");
    box.replaceChildren(...messages.map(messageElement));
    renderEmptyNote();
    box.scrollTop = box.scrollHeight;
  }

  function saveMessages() {
    store(STORE.messages, messages);
  }

  // ---- settings ------------------------------------------------------------------------------------------

  function fillSettings() {
    for (const [id, key] of Object.entries(FIELDS)) {
      $(id).value = typeof settings[key] === "string" ? settings[key] : "";
    }
  }

  // The request fields the settings ask for; throws an Error naming a field that is not valid.
  function settingsFields() {
    const out = {};
    const number = (key, name, integer) => {
      const raw = (settings[key] || "").trim();
      if (!raw) return;
      const value = Number(raw);
      if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
        throw new Error(`Settings: ${name} must be ${integer ? "an integer" : "a number"}, got "${raw}".`);
      }
      out[key] = value;
    };
    number("temperature", "temperature", false);
    number("top_p", "top p", false);
    number("max_tokens", "max tokens", true);
    number("seed", "seed", true);
    const extra = (settings.extra || "").trim();
    if (extra) {
      let parsed;
      try {
        parsed = JSON.parse(extra);
      } catch (e) {
        throw new Error(`Settings: the extra request fields are not valid JSON (${e.message}).`);
      }
      if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
        throw new Error("Settings: the extra request fields must be a JSON object, e.g. {\"top_k\": 40}.");
      }
      Object.assign(out, parsed);
    }
    return out;
  }

  function requestBody(fields) {
    const convo = [];
    const system = (settings.system || "").trim();
    if (system) convo.push({ role: "system", content: system });
    for (const m of messages) {
      if (m.role === "user" || m.content) convo.push({ role: m.role, content: m.content });
    }
    const body = { messages: convo, stream: true, stream_options: { include_usage: true } };
    if (modelName) body.model = modelName;
    return Object.assign(body, fields, { stream: true });
  }

  // ---- streaming -----------------------------------------------------------------------------------------

  // Calls onData(parsed JSON) for each server-sent event's data until [DONE] or the end of the body.
  async function readEvents(res, onData) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    const dispatch = () => {
      const payload = data.join("\n");
      data = [];
      if (payload === "[DONE]") return true;
      let parsed;
      try {
        parsed = JSON.parse(payload);
      } catch (e) {
        throw new Error(`The server sent data that is not JSON: ${payload.slice(0, 200)}`);
      }
      onData(parsed);
      return false;
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r\n|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (data.length && dispatch()) {
            reader.cancel().catch(() => {});
            return;
          }
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }                                            // comments (":...") and other fields are ignored
      }
    }
    buffer += decoder.decode();
    if (buffer.startsWith("data:")) data.push(buffer.slice(buffer.startsWith("data: ") ? 6 : 5));
    if (data.length) dispatch();
  }

  function statsText(timings, usage, measured) {
    if (timings && Number.isFinite(timings.predicted_per_second) && timings.predicted_n) {
      let text = `${timings.predicted_n} tokens, ${timings.predicted_per_second.toFixed(1)} tokens/s`;
      if (Number.isFinite(timings.prompt_per_second) && timings.prompt_n) {
        text += ` · prompt ${timings.prompt_n} tokens${timings.cache_n ? ` (+${timings.cache_n} cached)` : ""}, ` +
                `${timings.prompt_per_second.toFixed(1)} tokens/s`;
      }
      return text;
    }
    // no server timings (a stopped reply): measured here, from the first streamed piece to the end of the
    // stream (a piece is a token, but for the bytes of a character split across tokens)
    const n = (usage && usage.completion_tokens) || measured.pieces;
    if (!n) return "";
    const seconds = (measured.last - measured.first) / 1000;
    const rate = n > 1 && seconds > 0 ? `, ${((n - 1) / seconds).toFixed(1)} tokens/s (measured in the browser)` : "";
    return `${usage && usage.completion_tokens ? "" : "~"}${n} tokens${rate}`;
  }

  const FINISH = { length: "stopped at max tokens", shutdown: "the server shut down", tool_calls: "tool calls",
                   content_filter: "content filter" };

  function setBusy(busy) {
    $("send").hidden = busy;
    $("send").disabled = busy;
    $("stop").hidden = !busy;
    document.body.dataset.state = busy ? "streaming" : "idle";
  }

  async function send(text) {
    hideError();
    let fields;
    try {
      fields = settingsFields();
    } catch (e) {
      showError(e.message);
      return;
    }
    const user = { role: "user", content: text };
    messages.push(user);
    const body = requestBody(fields);
    const reply = { role: "assistant", content: "" };
    messages.push(reply);
    renderEmptyNote();
    const box = $("messages");
    box.appendChild(messageElement(user));
    const el = messageElement(reply);
    el.classList.add("streaming");
    box.appendChild(el);
    box.scrollTop = box.scrollHeight;
    const content = el.querySelector(".content");
    saveMessages();

    controller = new AbortController();
    const mine = controller;
    setBusy(true);
    $("timings").textContent = "";
    const measured = { pieces: 0, first: 0, last: 0 };
    let timings = null, usage = null, finish = null, lastSave = performance.now();
    // Pieces can come faster than the page can lay the text out (a small model on a fast machine sends
    // thousands a second): the text is redrawn once per frame at most, so the page (and Stop) stay responsive.
    let paintQueued = false;
    const paint = () => {
      paintQueued = false;
      const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
      renderContent(content, reply.content);
      if (atBottom) box.scrollTop = box.scrollHeight;
    };
    try {
      const res = await fetch("v1/chat/completions", { method: "POST", headers: headers(true),
                                                       body: JSON.stringify(body), signal: mine.signal });
      if (!res.ok) throw await httpError(res);
      await readEvents(res, (data) => {
        if (data.error) throw new Error(`Server error: ${data.error.message || JSON.stringify(data.error)}`);
        if (data.timings) timings = data.timings;
        if (data.usage) usage = data.usage;
        const choice = data.choices && data.choices[0];
        if (!choice) return;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          const now = performance.now();
          if (!measured.pieces) measured.first = now;
          measured.pieces += 1;
          reply.content += piece;
          if (!paintQueued) {
            paintQueued = true;
            requestAnimationFrame(paint);
          }
          if (now - lastSave > 500) {             // a reload mid-reply keeps what came so far
            saveMessages();
            lastSave = now;
          }
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      });
      reply.note = FINISH[finish] || (finish ? "" : "the stream ended early");
    } catch (e) {
      if (e.name === "AbortError") {
        reply.note = "stopped";
      } else {
        reply.note = "error";
        showError(e instanceof TypeError ? `The connection to the server failed (${e.message}).` : e.message);
        if (e.status === 401) askForKey();
      }
    } finally {
      mine.abort();                                // closes the connection if anything is still open
      if (controller === mine) controller = null;
      if (measured.pieces) measured.last = performance.now();   // a stopped reply was going until now
      paint();
      el.classList.remove("streaming");
      setBusy(false);
    }
    if (!reply.content && reply.note === "error") {
      // nothing came back: take the turn out and put the message back in the box to send again
      const at = messages.indexOf(user);
      if (at >= 0) messages.splice(at, 2);
      if (el.previousSibling) el.previousSibling.remove();
      el.remove();
      if (!$("input").value) $("input").value = text;
      renderEmptyNote();
    } else if (messages.includes(reply)) {          // (not after New chat)
      reply.stats = statsText(timings, usage, measured);
      $("timings").textContent = reply.stats ? `last reply: ${reply.stats}` : "";
      setNote(el, reply);
      el.dataset.done = "1";
    }
    saveMessages();
  }

  // ---- wiring --------------------------------------------------------------------------------------------

  function stop() {
    if (controller) controller.abort();
  }

  function init() {
    fillSettings();
    renderAll();
    setBusy(false);

    for (const [id, key] of Object.entries(FIELDS)) {
      $(id).addEventListener("input", () => {
        settings[key] = $(id).value;
        store(STORE.settings, settings);
      });
    }
    $("settings-reset").addEventListener("click", () => {
      settings = {};
      store(STORE.settings, settings);
      fillSettings();
    });
    $("api-key-show").addEventListener("click", () => askForKey("This server's API key (empty: none):"));
    $("settings-toggle").addEventListener("click", () => {
      const panel = $("settings");
      panel.hidden = !panel.hidden;
      $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
    });
    $("new-chat").addEventListener("click", () => {
      stop();
      messages = [];
      saveMessages();
      hideError();
      $("timings").textContent = "";
      renderAll();
      $("input").focus();
    });
    $("stop").addEventListener("click", stop);
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape" && controller) stop();
    });
    $("composer").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const text = $("input").value;
      if (!text.trim() || controller) return;
      $("input").value = "";
      send(text);
    });
    $("input").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $("composer").requestSubmit();
      }
    });
    const saveKey = async () => {
      apiKey = $("api-key").value.trim();
      store(STORE.apiKey, apiKey);
      hideError();
      if (await fetchModel()) $("input").focus();
    };
    $("api-key-save").addEventListener("click", saveKey);
    $("api-key").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") {
        ev.preventDefault();
        saveKey();
      }
    });
    fetchModel();
    $("input").focus();
  }

  init();
})();
