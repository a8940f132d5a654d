// voicecall console: everything goes through the RPC WebSocket (/rpc); no framework, no build step.
"use strict";

const TERMINAL = new Set(["completed", "hangup-user", "hangup-bot", "timeout", "error", "failed",
  "no-answer", "busy", "voicemail", "transferred"]);
const $ = (sel) => document.querySelector(sel);

const state = {
  ws: null, nextId: 1, pending: new Map(), calls: new Map(), events: new Map(), partial: new Map(),
  selected: null, levelsFor: null, methods: [], retry: null,
};

// ------------------------------------------------------------------ small helpers
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k.startsWith("data-")) node.setAttribute(k, v); else node[k] = v;
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  return node;
}
const isLive = (call) => !TERMINAL.has(call.state);
function duration(call) {
  if (!call.answeredAt) return "";
  const s = Math.max(0, Math.round((call.endedAt || Date.now() / 1000) - call.answeredAt));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}
const answeredBy = (call) => call.answeredBy || (call.metadata || {}).answeredBy || "";
const clock = (ts) => new Date(ts * 1000).toLocaleTimeString();

// ------------------------------------------------------------------ session
async function boot() {
  let session;
  try {
    session = await (await fetch("/console/session", { credentials: "same-origin" })).json();
  } catch (err) {
    setConn(false);
    state.retry = setTimeout(boot, 2000);
    return;
  }
  state.methods = session.methods || [];
  $("#provider").textContent = `provider: ${session.provider}`;
  $("#transfer-form").hidden = !state.methods.includes("voicecall.transfer");
  $("#logout").hidden = !session.tokenRequired;
  if (!session.authenticated) {
    $("#app").hidden = true;
    $("#login-panel").hidden = false;
    $("#token").focus();
    return;
  }
  $("#login-panel").hidden = true;
  $("#app").hidden = false;
  connect();
}

$("#login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const reply = await fetch("/console/login", {
    method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: $("#token").value }),
  });
  $("#token").value = "";
  if (reply.ok) { $("#login-error").textContent = ""; boot(); }
  else $("#login-error").textContent = reply.status === 401 ? "Wrong token." : "Login refused.";
});

$("#logout").addEventListener("click", async () => {
  await fetch("/console/logout", { method: "POST", credentials: "same-origin" });
  if (state.ws) state.ws.close();
  location.reload();
});

// ------------------------------------------------------------------ RPC over the WebSocket
function setConn(on) {
  const badge = $("#conn");
  badge.textContent = on ? "live" : "offline";
  badge.className = `badge ${on ? "on" : "off"}`;
}

function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/rpc`);
  state.ws = ws;
  ws.onopen = async () => {
    setConn(true);
    await rpc("voicecall.subscribe");
    await refreshList();
    if (state.selected) select(state.selected);
  };
  ws.onmessage = (msg) => {
    const data = JSON.parse(msg.data);
    if (data.id != null && state.pending.has(data.id)) {
      const { resolve, reject } = state.pending.get(data.id);
      state.pending.delete(data.id);
      if (data.error) reject(new Error(data.error.message)); else resolve(data.result);
    } else if (data.method === "voicecall.event") {
      onEvent(data.params);
    }
  };
  ws.onclose = () => {
    setConn(false);
    for (const { reject } of state.pending.values()) reject(new Error("connection closed"));
    state.pending.clear();
    state.levelsFor = null;
    if (state.ws === ws) { state.ws = null; state.retry = setTimeout(boot, 1000); }
  };
}

function rpc(method, params) {
  return new Promise((resolve, reject) => {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) { reject(new Error("not connected")); return; }
    const id = state.nextId++;
    state.pending.set(id, { resolve, reject });
    state.ws.send(JSON.stringify({ jsonrpc: "2.0", id, method, params: params || {} }));
  });
}

async function refreshList() {
  const { calls } = await rpc("voicecall.list", { limit: 500 });
  for (const call of calls) state.calls.set(call.callId, call);
  render();
}

async function refreshCall(callId) {
  const reply = await rpc("voicecall.status", { callId });
  if (reply.found) { state.calls.set(callId, reply.call); render(); }
}

// ------------------------------------------------------------------ events
function note(callId, text) {
  const list = state.events.get(callId) || [];
  list.push({ t: Date.now() / 1000, text });
  if (list.length > 300) list.splice(0, list.length - 300);
  state.events.set(callId, list);
}

function onEvent(ev) {
  const id = ev.callId;
  if (ev.type === "call.levels") { if (id === state.selected) showLevels(ev); return; }
  const call = state.calls.get(id);
  if (call && ev.state) call.state = ev.state;
  switch (ev.type) {
    case "call.speaking": if (call) call.transcript.push({ speaker: "bot", text: ev.text, timestamp: Date.now() / 1000 });
      note(id, `bot speaks: ${ev.text}`); break;
    case "call.speech": state.partial.delete(id);
      if (call) call.transcript.push({ speaker: "user", text: ev.transcript, timestamp: Date.now() / 1000 });
      note(id, `caller said: ${ev.transcript}`); break;
    case "call.partial": state.partial.set(id, ev.transcript); break;
    case "call.turn": if (call) { (call.turns = call.turns || []).push(ev.turn); }
      note(id, `turn ${ev.turn.n}: ${ev.turn.totalMs ?? "?"} ms`); break;
    case "call.dtmf": note(id, `keys from caller: ${ev.digits}`); break;
    case "call.answered_by": if (call) call.metadata.answeredBy = ev.answeredBy;
      note(id, `answered by ${ev.answeredBy}`); break;
    case "call.error": note(id, `error: ${ev.error}`); break;
    case "call.ended": note(id, `ended: ${ev.reason}`); break;
    case "call.transfer":
      note(id, ev.phase === "started" ? `transfer to ${ev.to} (${ev.mode})` : `transfer ${ev.outcome}`); break;
    case "call.state": note(id, `state ${ev.state}`); break;
    default: note(id, ev.type.replace(/^call\./, ""));
  }
  if (!call || ["call.created", "call.answered", "call.ended"].includes(ev.type)) refreshCall(id).catch(() => {});
  else render();
}

// ------------------------------------------------------------------ rendering
function render() {
  renderLive();
  renderHistory();
  renderDetail();
}

function renderLive() {
  const body = $("#live tbody");
  const live = [...state.calls.values()].filter(isLive).sort((a, b) => b.startedAt - a.startedAt);
  body.replaceChildren(...live.map((c) => {
    const row = el("tr", { "data-call-id": c.callId, class: c.callId === state.selected ? "selected" : "" },
      el("td", {}, el("span", { class: "badge" }, c.state)), el("td", {}, c.provider), el("td", {}, c.from),
      el("td", {}, c.to), el("td", {}, (c.metadata || {}).mode || ""), el("td", { class: "dur" }, duration(c)),
      el("td", {}, answeredBy(c)));
    row.addEventListener("click", () => select(c.callId));
    return row;
  }));
  $("#live-empty").hidden = live.length > 0;
}

function matches(call, query) {
  if (!query) return true;
  const words = (call.transcript || []).map((t) => t.text).join(" ");
  return [call.callId, call.from, call.to, call.state, call.provider, words].join(" ").toLowerCase().includes(query);
}

function renderHistory() {
  const query = $("#search").value.trim().toLowerCase();
  const calls = [...state.calls.values()].filter((c) => matches(c, query)).sort((a, b) => b.startedAt - a.startedAt);
  $("#history tbody").replaceChildren(...calls.slice(0, 200).map((c) => {
    const play = el("button", { class: "link play", type: "button", title: "Play the recording" }, "▶ play");
    play.addEventListener("click", (e) => { e.stopPropagation(); playRecording(c.callId); });
    const row = el("tr", { "data-call-id": c.callId, class: c.callId === state.selected ? "selected" : "" },
      el("td", {}, clock(c.startedAt)), el("td", {}, el("code", {}, c.callId.slice(0, 8))), el("td", {}, c.from),
      el("td", {}, c.to), el("td", { class: "state" }, c.state), el("td", {}, duration(c)),
      el("td", {}, isLive(c) ? "" : play));
    row.addEventListener("click", () => select(c.callId));
    return row;
  }));
}

function renderDetail() {
  const call = state.calls.get(state.selected);
  $("#detail").hidden = !call;
  if (!call) return;
  $("#detail-id").textContent = call.callId;
  $("#detail-state").textContent = call.state;
  const lines = (call.transcript || []).map((t) => el("li", { class: t.speaker === "bot" ? "bot" : "user" },
    el("span", { class: "who" }, t.speaker === "bot" ? "bot" : "caller"), t.text));
  const partial = state.partial.get(call.callId);
  if (partial) lines.push(el("li", { class: "user partial" }, el("span", { class: "who" }, "caller"), partial));
  const list = $("#transcript");
  list.replaceChildren(...lines);
  list.scrollTop = list.scrollHeight;
  const turns = (call.turns || []).map((t) => el("tr", {}, el("td", {}, t.n),
    ...["totalMs", "sttMs", "modelMs", "pieceMs", "ttsMs", "bridgeMs"].map((k) => el("td", {}, t[k] ?? "–"))));
  $("#turns tbody").replaceChildren(...turns);
  $("#timeline").replaceChildren(...(state.events.get(call.callId) || []).map((e) =>
    el("li", {}, el("span", { class: "t" }, clock(e.t)), e.text)));
  $("#timeline").scrollTop = $("#timeline").scrollHeight;
  $("#controls").hidden = !isLive(call);
  document.querySelector(".meters").hidden = !isLive(call);
}

function showLevels(ev) {
  for (const side of ["caller", "bot"]) {
    const bar = $(`#meter-${side}`);
    const value = ev[side] || 0;
    const db = value > 0 ? 20 * Math.log10(value) : -100;
    bar.style.width = `${Math.max(0, Math.min(100, ((db + 60) / 60) * 100))}%`;
    bar.dataset.level = String(value);
    bar.dataset.max = String(Math.max(Number(bar.dataset.max) || 0, value));
  }
}

async function select(callId) {
  state.selected = callId;
  for (const side of ["caller", "bot"]) {
    const bar = $(`#meter-${side}`);
    bar.style.width = "0"; bar.dataset.level = "0"; bar.dataset.max = "0";
  }
  render();
  const call = state.calls.get(callId);
  if (state.levelsFor && state.levelsFor !== callId) {
    rpc("voicecall.levels", { callId: state.levelsFor, on: false }).catch(() => {});
    state.levelsFor = null;
  }
  if (call && isLive(call) && state.levelsFor !== callId) {
    state.levelsFor = callId;
    rpc("voicecall.levels", { callId, on: true }).catch(() => { state.levelsFor = null; });
  }
  await refreshCall(callId).catch(() => {});
}

function playRecording(callId) {
  select(callId);
  const player = $("#player");
  player.hidden = false;
  player.src = `/console/recordings/${encodeURIComponent(callId)}`;
  player.play().catch(() => {});
}

// ------------------------------------------------------------------ controls
async function act(errorBox, work) {
  $(errorBox).textContent = "";
  try { await work(); } catch (err) { $(errorBox).textContent = err.message; }
}

$("#place-form").addEventListener("submit", (e) => {
  e.preventDefault();
  act("#place-error", async () => {
    const params = { message: $("#message").value, mode: $("#mode").value };
    if ($("#to").value.trim()) params.to = $("#to").value.trim();
    const { callId } = await rpc("voicecall.initiate", params);
    note(callId, "placed from the console");
    await refreshCall(callId);
    await select(callId);
  });
});

$("#speak-form").addEventListener("submit", (e) => {
  e.preventDefault();
  act("#control-error", async () => {
    await rpc("voicecall.speak", { callId: state.selected, message: $("#speak-text").value });
    $("#speak-text").value = "";
  });
});

$("#keys-form").addEventListener("submit", (e) => {
  e.preventDefault();
  act("#control-error", async () => {
    const digits = $("#keys").value.trim();
    await rpc("voicecall.dtmf", { callId: state.selected, digits });
    note(state.selected, `keys sent: ${digits}`);
    $("#keys").value = "";
    render();
  });
});

$("#transfer-form").addEventListener("submit", (e) => {
  e.preventDefault();
  act("#control-error", () => rpc("voicecall.transfer", { callId: state.selected, to: $("#transfer-to").value }));
});

$("#end-call").addEventListener("click", () => act("#control-error", () => rpc("voicecall.end", { callId: state.selected })));
$("#search").addEventListener("input", renderHistory);
setInterval(renderLive, 1000);

boot();
