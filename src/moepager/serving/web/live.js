// moepager's live view: a chat that streams through the server's own /v1/chat/completions, and a panel drawn
// from the server-sent events of /events (their JSON shape: docs/live.md). Plain JS, nothing from the network.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = { m: "#e5484d", f: "#3e63dd", h: "#30a46c", p: "#8e4ec6", r: "#b4c0d3", e: "#f5a623", ".": "#f0f0f3" };
const NAMES = { m: "miss", f: "prefetched", h: "hit", p: "pinned", r: "resident", e: "evicted", ".": "not cached" };
const live = { last: null, paused: false, events: 0 };
window.moepagerLive = live; // the last event, for whoever inspects the page

// ------------------------------------------------------------------------------------------- formatting

const num = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(0) + "%");
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
}
function el(tag, text, attrs = {}) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

// ------------------------------------------------------------------------------------------- the panel

// Each event changes a few numbers: nodes are made once and only their text is set, and a part is rebuilt only
// when what it shows changed, so the browser lays the page out as little as possible (it shares the CPU
// with the server when both run on one machine).
const shown = {};

function changed(part, value) {
  const key = JSON.stringify(value);
  if (shown[part] === key) return false;
  shown[part] = key;
  return true;
}

function tiles(ev) {
  const s = ev.speed, x = ev.experts || {};
  const rows = [
    ["tok/s", num(s.tokens_per_s)], ["decode tok/s", num(s.decode_tokens_per_s)],
    ["first token", s.time_to_first_token_s === null ? "–" : num(s.time_to_first_token_s, 2) + " s"],
    ["hit rate", pct(x.hit_rate)], ["prefetch precision", pct(x.prefetch_precision)],
    ["MiB read / token", num(x.mib_read_per_token, 2)], ["disk MB/s", num(x.disk_mb_per_s, 1)],
    ["cache", x.capacity ? `${x.capacity} / ${x.total_experts}` : "all resident"],
  ];
  const box = $("tiles");
  if (box.children.length !== rows.length) {
    box.replaceChildren(...rows.map(([name]) => {
      const t = el("div", undefined, { class: "tile", "data-name": name });
      t.append(el("b", ""), el("span", name));
      return t;
    }));
  }
  rows.forEach(([, value], i) => {
    const b = box.children[i].firstChild;
    if (b.textContent !== value) b.textContent = value;
  });
}

function heat(ev) {
  const canvas = $("heat"), h = ev.heat;
  if (!h) {
    canvas.hidden = true;
    $("heat-note").textContent = "Every expert is resident: nothing is paged (serve with --expert-memory or --memory-limit to page).";
    return;
  }
  canvas.hidden = false;
  const rows = h.rows.length, cols = h.experts, label = 28;
  const cell = Math.max(3, Math.min(18, Math.floor((640 - label) / cols)));
  // setting a canvas's size reallocates (and clears) it: only when the shape changes; then only the cells whose
  // state changed since the last event are painted again
  const width = label + cols * cell, height = rows * cell;
  const g = canvas.getContext("2d");
  let before = live.drawn;
  if (canvas.width !== width || canvas.height !== height || !before || before.layers !== h.layers.join()) {
    canvas.width = width;
    canvas.height = height;
    g.fillStyle = "#fff";
    g.fillRect(0, 0, width, height);
    before = null;
  }
  const counts = {};
  for (let r = 0; r < rows; r++) {
    const row = h.rows[r], old = before ? before.rows[r] : "";
    for (let c = 0; c < cols; c++) {
      const s = row[c];
      counts[s] = (counts[s] || 0) + 1;
      if (old[c] === s) continue;
      g.fillStyle = COLORS[s] || "#000";
      g.fillRect(label + c * cell, r * cell, cell - (cell > 4 ? 1 : 0), cell - (cell > 4 ? 1 : 0));
    }
    if (!before && cell >= 8 && (rows <= 32 || r % 4 === 0)) {
      g.fillStyle = "#60646c";
      g.font = `${Math.min(11, cell)}px system-ui`;
      g.fillText(String(h.layers[r]), 2, r * cell + cell - 2);
    }
  }
  live.drawn = { rows: h.rows, layers: h.layers.join() };
  canvas.dataset.seq = ev.seq;
  canvas.dataset.counts = Object.keys(counts).sort().map((k) => `${k}:${counts[k]}`).join(" ");
  if (changed("heat-note", [h.layers[0], h.layers[h.layers.length - 1], cols])) $("heat-note").textContent = `layers ${h.layers[0]}–${h.layers[h.layers.length - 1]} (rows) × ${cols} experts (columns); each event shows what happened since the one before`;
}

function legend() {
  $("legend").replaceChildren(...Object.keys(NAMES).map((k) => {
    const s = el("span", NAMES[k]);
    const i = el("i");
    i.style.background = COLORS[k];
    s.prepend(i);
    return s;
  }));
}

const MEMORY_COLORS = { runtime: "#8b8d98", dense_weights: "#3e63dd", kv_cache: "#30a46c", buffers: "#c2c6cf", expert_read_staging: "#f5a623", expert_cache: "#8e4ec6" };

function memory(ev) {
  const m = ev.memory, cats = m.categories;
  if (!changed("memory", [Object.entries(cats).map(([k, v]) => [k, bytes(v)]), bytes(m.rss_bytes), m.limit_bytes])) return;
  const total = Object.values(cats).reduce((a, b) => a + b, 0);
  const scale = Math.max(total, m.limit_bytes || 0, m.rss_bytes);
  $("memory-bar").replaceChildren(...Object.entries(cats).map(([k, v]) => {
    const d = el("div", undefined, { title: `${k.replaceAll("_", " ")}: ${bytes(v)}` });
    d.style.width = (100 * v / scale) + "%";
    d.style.background = MEMORY_COLORS[k];
    return d;
  }));
  const rows = Object.entries(cats).map(([k, v]) => [k.replaceAll("_", " "), bytes(v), MEMORY_COLORS[k]]);
  rows.push(["resident (RSS)", bytes(m.rss_bytes)]);
  rows.push(["limit", m.limit_bytes ? bytes(m.limit_bytes) : "none (--memory-limit)"]);
  $("memory").replaceChildren(...rows.map(([k, v, color]) => {
    const tr = el("tr");
    const name = el("td", k);
    if (color) { const i = el("i"); i.style.cssText = `display:inline-block;width:.8em;height:.8em;margin-right:.4em;background:${color}`; name.prepend(i); }
    tr.append(name, el("td", v));
    return tr;
  }));
}

function requests(ev) {
  const r = ev.requests;
  // ages tick every event: shown to the tenth of a second, a row is rebuilt when its text changes
  if (!changed("requests", [r.running, r.waiting, r.max_batch, num(r.mean_batch, 2), r.sequences.map((q) =>
    [q.state, q.prompt_tokens, q.generated, q.max_tokens, num(q.age_s), q.time_to_first_token_s])])) return;
  $("queue").textContent = `${r.running} running, ${r.waiting} waiting (batch up to ${r.max_batch}; mean batch ${num(r.mean_batch, 2)})`;
  $("requests").tBodies[0].replaceChildren(...r.sequences.map((q) => {
    const tr = el("tr");
    for (const v of [q.state, q.prompt_tokens, q.generated, q.max_tokens, num(q.age_s) + " s",
      q.time_to_first_token_s === null ? "–" : num(q.time_to_first_token_s, 2) + " s"]) tr.append(el("td", String(v)));
    return tr;
  }));
}

function render(ev) {
  if ($("model-name").textContent !== ev.model) $("model-name").textContent = ev.model;
  tiles(ev);
  heat(ev);
  memory(ev);
  requests(ev);
}

function connect() {
  const source = new EventSource("/events");
  source.onopen = () => { $("link").textContent = "live"; $("link").className = "status on"; };
  source.onerror = () => { $("link").textContent = "reconnecting"; $("link").className = "status off"; };
  source.onmessage = (msg) => {
    const ev = JSON.parse(msg.data);
    live.events++;
    if (live.paused) return;
    live.last = ev;
    render(ev);
  };
}

function togglePause() {
  live.paused = !live.paused;
  $("pause-note").textContent = live.paused ? "paused (click the map or press p in it to resume)" : "";
}

// ------------------------------------------------------------------------------------------- the chat

const history = [];
let controller = null;

function addMessage(role, text) {
  const div = el("div", text, { class: `msg ${role}` });
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function requestBody() {
  const body = { model: $("model").value, stream: true, stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || 256, temperature: Number($("temperature").value),
    top_p: Number($("top-p").value) };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const stops = $("stop").value.split("\n").filter((s) => s.length);
  if (stops.length) body.stop = stops;
  if ($("json-mode").checked) body.response_format = { type: "json_object" };
  const system = $("system").value.trim();
  body.messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  return body;
}

async function send(text) {
  $("chat-error").textContent = "";
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.classList.add("streaming");
  const headers = { "Content-Type": "application/json" };
  if ($("api-key").value) headers.Authorization = "Bearer " + $("api-key").value;
  controller = new AbortController();
  $("send").disabled = true;
  $("stop-reply").disabled = false;
  let reply = "", finish = null, usage = null;
  const t0 = performance.now();
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(requestBody()), signal: controller.signal });
    if (!res.ok) throw new Error((await res.json()).error?.message || res.statusText);
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta?.content) { reply += choice.delta.content; out.textContent = reply; }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") $("chat-error").textContent = String(e.message || e);
    finish = finish || "stopped";
  } finally {
    out.classList.remove("streaming");
    out.dataset.done = "1";
    const secs = (performance.now() - t0) / 1000;
    const meta = el("span", `${finish || ""}${usage ? `, ${usage.completion_tokens} tokens` : ""}, ${secs.toFixed(1)} s`, { class: "meta" });
    out.append(meta);
    history.push({ role: "assistant", content: reply });
    controller = null;
    $("send").disabled = false;
    $("stop-reply").disabled = true;
  }
}

async function loadModel() {
  try {
    const headers = $("api-key").value ? { Authorization: "Bearer " + $("api-key").value } : {};
    const res = await fetch("/v1/models", { headers });
    const data = await res.json();
    if (data.data?.length && !$("model").value) $("model").value = data.data[0].id;
  } catch (e) { /* the key may be needed: the user types it and the model name */ }
}

function setUp() {
  legend();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop-reply").addEventListener("click", () => controller && controller.abort());
  $("reset").addEventListener("click", () => { history.length = 0; $("messages").replaceChildren(); });
  $("heat").addEventListener("click", togglePause);
  $("heat").tabIndex = 0;
  $("heat").addEventListener("keydown", (e) => { if (e.key === "p") togglePause(); });
  $("api-key").addEventListener("change", loadModel);
  loadModel();
  connect();
}

setUp();
