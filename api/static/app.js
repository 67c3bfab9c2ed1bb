// The hacer control app: REST for actions, Socket.IO for live state. Plain JS, no build step.
"use strict";

const state = { nodes: new Map(), runs: new Map(), seq: 0, watching: null,
                token: localStorage.getItem("hacerToken") || "" };
const $ = (selector) => document.querySelector(selector);

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const response = await fetch("/api" + path, { method, headers, body: body && JSON.stringify(body) });
  if (response.status === 401) {
    state.token = prompt("This hacer needs its API token:") || "";
    localStorage.setItem("hacerToken", state.token);
    return api(method, path, body);
  }
  const data = await response.json();
  if (!response.ok) throw new Error(data.message || response.statusText);
  return data;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function renderNodes() {
  // Never redraw under the user's typing: wait until the table loses focus.
  if ($("#nodes").contains(document.activeElement)) { state.renderLater = true; return; }
  const body = $("#nodes tbody");
  body.replaceChildren();
  for (const node of [...state.nodes.values()].sort((a, b) => a.id - b.id)) {
    const row = body.insertRow();
    row.dataset.id = node.id;
    cell(row, node.id);
    const name = document.createElement("input");
    name.className = "name";
    name.value = node.name;
    name.setAttribute("aria-label", "name of " + node.id);
    name.addEventListener("change", () => rename(node.id, name.value));
    row.insertCell().append(name);
    cell(row, node.type);
    cell(row, node.ip);
    cell(row, node.state, "state-" + node.state);
    cell(row, Object.entries(node.values || {}).map(([k, v]) => `${k}=${v}`).join(" "));
    const key = document.createElement("input");
    key.className = "value"; key.placeholder = "key"; key.setAttribute("aria-label", "key for " + node.id);
    const value = document.createElement("input");
    value.className = "value"; value.placeholder = "value"; value.setAttribute("aria-label", "value for " + node.id);
    const send = document.createElement("button");
    send.textContent = "set";
    send.addEventListener("click", () => setValue(node.id, key.value, value.value));
    row.insertCell().append(key, value, send);
  }
}

$("#nodes").addEventListener("focusout", () => {
  if (state.renderLater) { state.renderLater = false; setTimeout(renderNodes); }
});

async function rename(id, name) {
  try { await api("POST", `/nodes/id/${id}`, { name }); } catch (error) { alert(error.message); }
}

async function setValue(id, key, value) {
  const number = Number(value);
  try {
    await api("POST", `/nodes/id/${id}/set`, { [key]: value.trim() !== "" && Number.isInteger(number) ? number : value });
  } catch (error) { alert(error.message); }
}

async function loadScripts() {
  const { script_list } = await api("GET", "/scripts/list");
  $("#script").replaceChildren(...script_list.map((s) => new Option(s.name, s.name)));
}

// Runs: history from REST, kept current by run events (the database may lag the bus a little).
const finished = (runState) => runState && !["queued", "running"].includes(runState);

async function loadRuns() {
  const { runs } = await api("GET", "/runs?per_page=20");
  for (const run of runs) {
    const known = state.runs.get(run.run_id);
    // The database may lag the bus: an end already seen in an event is never undone by it.
    const merged = { ...known, ...run };
    if (known && finished(known.state) && !finished(run.state)) {
      Object.assign(merged, { state: known.state, exit_code: known.exit_code });
    }
    state.runs.set(run.run_id, merged);
  }
  renderRuns();
}

function updateRun(data) {
  const known = state.runs.get(data.run_id);
  state.runs.set(data.run_id, { thread_id: "", started_at: "", ...known, ...data });
  renderRuns();
  if (!known || known.thread_id === "") loadRuns();  // its thread id and times
}

function renderRuns() {
  const body = $("#runs tbody");
  body.replaceChildren();
  const order = (run) => (run.thread_id === "" ? Infinity : run.thread_id);
  for (const run of [...state.runs.values()].sort((a, b) => order(b) - order(a)).slice(0, 20)) {
    const row = body.insertRow();
    row.dataset.runId = run.run_id;
    cell(row, run.thread_id);
    cell(row, run.script);
    cell(row, run.params.join(" "));
    cell(row, run.state);
    cell(row, run.exit_code ?? "");
    cell(row, run.started_at);
    row.addEventListener("click", () => showLog(run.run_id, run.thread_id));
  }
}

async function showLog(runId, threadId) {
  $("#log").textContent = "";
  watch(runId);  // the server sends the entries it still keeps, then the live ones
  $("#log-run").textContent = "#" + threadId;
  const { entry_list } = await api("GET", `/logs/script/thread_id/${threadId}`);
  if (state.watching !== runId || state.logShown.size) return;  // the live view had it
  // An older run: its history; logs are numbered from 1 without gaps, so position is seq.
  entry_list.forEach((e, index) => state.logShown.add(index + 1));
  $("#log").textContent = entry_list.map((e) => `[${e.entry_type}] ${e.data}\n`).join("");
}

function watch(runId) {
  if (state.watching) socket.emit("unwatch_run", { run_id: state.watching });
  state.watching = runId;
  state.logShown = new Set();
  socket.emit("watch_run", { run_id: runId });
}

$("#run-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const params = $("#params").value.trim().split(/\s+/).filter(Boolean);
  try {
    const started = await api("POST", "/scripts/exec/name/" + encodeURIComponent($("#script").value), { params });
    $("#log").textContent = "";
    $("#log-run").textContent = "#" + started.log_thread_id;
    watch(started.run_id);
  } catch (error) { alert(error.message); }
});

// Automations: REST is the truth (disabled ones too); the scheduler's events say when to re-read.
state.automations = new Map();
state.lastFires = new Map();

function describeTrigger(t) {
  const zone = t.tz && t.tz !== "UTC" ? ` (${t.tz})` : "";
  switch (t.kind) {
    case "cron": return `cron ${t.cron}${zone}`;
    case "every": return `every ${t.seconds} s`;
    case "at": return `at ${t.at}${zone}`;
    case "sun": return `${t.event}${t.offset ? ` ${t.offset > 0 ? "+" : ""}${t.offset} s` : ""}${zone}`;
    case "presence": return `node ${t.node} goes ${t.becomes}`;
    case "value":
      return `node ${t.node} ${t.key}` + (t.below != null ? ` < ${t.below}` : t.above != null ? ` > ${t.above}` : " changes");
    case "run": return `${t.script} ends ${t.states.join("/")}`;
    default: return t.kind;
  }
}

const localTime = (iso) => (iso ? new Date(iso).toLocaleString() : "");

async function loadAutomations() {
  const { automations } = await api("GET", "/automations");
  state.automations = new Map(automations.map((a) => [a.id, a]));
  renderAutomations();
}

let automationReload = null;
function reloadAutomationsSoon() {  // a burst of events, one read
  clearTimeout(automationReload);
  automationReload = setTimeout(loadAutomations, 200);
}

function renderAutomations() {
  const body = $("#automations tbody");
  body.replaceChildren();
  for (const automation of [...state.automations.values()].sort((a, b) => a.id - b.id)) {
    const { id, name, enabled, definition } = automation;
    const row = body.insertRow();
    row.dataset.id = id;
    cell(row, name);
    cell(row, describeTrigger(definition.trigger));
    cell(row, [definition.script, ...definition.params].join(" "));
    cell(row, enabled ? localTime(automation.next_fires[0]) : "");
    const fired = state.lastFires.get(id) || automation.last_runs[0];
    cell(row, fired ? `${localTime(fired.due)}${fired.state ? " " + fired.state : ""}` : "", "last-fire");
    const toggle = document.createElement("button");
    toggle.textContent = enabled ? "on" : "off";
    toggle.className = enabled ? "on" : "off";
    toggle.addEventListener("click", () => changeAutomation("POST", `/automations/${id}/${enabled ? "disable" : "enable"}`));
    row.insertCell().append(toggle);
    const remove = document.createElement("button");
    remove.textContent = "delete";
    remove.addEventListener("click", () => confirm(`Delete ${name}?`) && changeAutomation("DELETE", `/automations/${id}`));
    row.insertCell().append(remove);
  }
}

async function changeAutomation(method, path) {
  try { await api(method, path); } catch (error) { alert(error.message); }
  loadAutomations();
}

$("#automation-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("#automation-error").textContent = "";
  let definition;
  try { definition = JSON.parse($("#automation-definition").value); } catch (error) {
    $("#automation-error").textContent = "not JSON: " + error.message;
    return;
  }
  try {
    await api("POST", "/automations", definition);
    $("#automation-definition").value = "";
    loadAutomations();
  } catch (error) { $("#automation-error").textContent = error.message; }
});

function applySnapshot(snapshot) {
  state.seq = snapshot.seq;
  state.nodes = new Map(snapshot.nodes.map((n) => [n.id, n]));
  showBridge(snapshot.bridge);
  showRunners(snapshot.runners);
  renderNodes();
  loadRuns();
}

function showBridge(bridgeState) {
  $("#bridge").textContent = "bridge " + bridgeState;
  $("#bridge").className = "badge " + (bridgeState === "online" ? "online" : "offline");
}

const runners = new Map();
function showRunners(list) {
  for (const runner of list) runners.set(runner.runner, runner);
  const online = [...runners.values()].filter((r) => r.state === "online").length;
  $("#runners").textContent = `runners ${online}`;
  $("#runners").className = "badge " + (online ? "online" : "offline");
}

function applyEvent(event) {
  if (event.seq) state.seq = Math.max(state.seq, event.seq);
  const data = event.data;
  if (event.kind === "node") { state.nodes.set(data.id, data); renderNodes(); }
  else if (event.kind === "node_removed") { state.nodes.delete(data.id); renderNodes(); }
  else if (event.kind === "bridge") showBridge(data.state);
  else if (event.kind === "runner") showRunners([data]);
  else if (event.kind === "run") updateRun(data);
  else if (event.kind === "automation_fired") { state.lastFires.set(data.id, data); renderAutomations(); }
  else if (event.kind.startsWith("automation")) reloadAutomationsSoon();
  else if (event.kind === "log" && data.run_id === state.watching && !state.logShown.has(data.seq)) {
    state.logShown.add(data.seq);  // a late watcher gets the run's kept entries, maybe twice
    $("#log").textContent += `[${data.entry_type}] ${data.data}\n`;
  }
}

// On every (re)connect the server gets the last seq seen: it answers with what was missed,
// or a fresh snapshot when that is no longer kept (or on the first connect, seq null).
let connectedBefore = false;
const socket = io({
  auth: (send) => send({ token: state.token, seq: connectedBefore ? state.seq : null }),
  transports: ["websocket"],
});
socket.on("connect", () => {
  $("#connection").textContent = "live";
  $("#connection").className = "badge online";
  if (state.watching) socket.emit("watch_run", { run_id: state.watching });
  connectedBefore = true;
  loadScripts();
  loadRuns();
  loadAutomations();
});
socket.on("disconnect", () => {
  $("#connection").textContent = "reconnecting…";
  $("#connection").className = "badge offline";
});
socket.on("snapshot", applySnapshot);
socket.on("event", applyEvent);
