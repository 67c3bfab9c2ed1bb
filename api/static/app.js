// The hacer control app: REST for actions, Socket.IO for live state. Plain JS, no build step.
"use strict";

const state = { nodes: new Map(), runs: new Map(), seq: 0, watching: null, scriptNames: [],
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
  // Its column's name, shown before it on a phone, where a row is a block and the header is hidden.
  const header = row.closest("table")?.tHead?.rows[0]?.cells[td.cellIndex];
  if (header && header.textContent) td.dataset.label = header.textContent;
  return td;
}

// --- nodes: a card each, with the control its type calls for ------------------------------------

const CHART_KEY = { toggle: "on", thermostat: "temperature", sensor_temp: "temperature" };
const ago = (seconds) => {
  const s = Math.max(0, Math.round(seconds));
  return s < 90 ? `${s} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
};
const clock = (t) => new Date(t * 1000).toLocaleTimeString();
const hex = (color) => "#" + Number(color || 0).toString(16).padStart(6, "0");

function element(tag, props = {}, ...children) {
  const made = Object.assign(document.createElement(tag), props);
  for (const [name, value] of Object.entries(props.attrs || {})) made.setAttribute(name, value);
  made.append(...children.filter((child) => child != null));
  return made;
}

function labelOf(node) { return node.name || `${node.type} ${node.id}`; }

function renderNodes() {
  // Never redraw under the user's typing: wait until the field loses focus.
  const active = document.activeElement;
  if ($("#nodes").contains(active) && active.matches("input:not([type=color])")) { state.renderLater = true; return; }
  // A button or picker keeps the focus across the redraw (keyboard users stay where they were).
  const focused = $("#nodes").contains(active) && [active.closest("article").dataset.id, active.className];
  const cards = [...state.nodes.values()].sort((a, b) => a.id - b.id).map(nodeCard);
  $("#nodes").replaceChildren(...cards);
  if (focused) $(`#nodes article[data-id="${focused[0]}"]`)?.getElementsByClassName(focused[1])[0]?.focus();
  renderNodePicker();
  refreshSeen();
}

function nodeCard(node) {
  const name = element("input", { className: "name", value: node.name, placeholder: "unnamed",
                                  attrs: { "aria-label": `name of ${node.id}` } });
  name.addEventListener("change", () => rename(node.id, name.value));
  const presence = element("span", { className: `presence state-${node.state}`, textContent: node.state });
  const seen = element("span", { className: "seen" });
  const answer = node.answering === false
    ? element("p", { className: "answer", attrs: { role: "status" }, textContent: `not answering: ${node.answer_error || "no reply"}` })
    : null;
  const history = element("button", { type: "button", className: "history", textContent: "history",
                                       attrs: { "aria-label": `history of ${labelOf(node)}` } });
  history.addEventListener("click", () => openHistory(node.id));
  return element("article", { className: "card", attrs: { "data-id": node.id, "data-state": node.state, "aria-label": labelOf(node) } },
    element("header", {}, name, element("span", { className: "type", textContent: `${node.type} · ${node.id}` })),
    element("p", { className: "status" }, presence, " ", seen),
    answer,
    control(node),
    history);
}

function reading(node, key) { return (node.readings || {})[key] || (key in (node.values || {}) ? { value: node.values[key] } : null); }

function control(node) {
  const values = node.values || {};
  if (node.type === "toggle") {
    const on = values.on === 1;
    const button = element("button", { type: "button", className: "switch", textContent: on ? "on" : "off",
      attrs: { role: "switch", "aria-checked": String(on), "aria-label": `${labelOf(node)} on` } });
    button.addEventListener("click", () => setValues(node.id, { on: on ? 0 : 1 }));
    return element("div", { className: "control" }, button);
  }
  if (node.type === "light_rgb") {
    const picker = element("input", { type: "color", className: "color", value: hex(values.color),
      attrs: { "aria-label": `colour of ${labelOf(node)}` } });
    picker.addEventListener("change", () => setValues(node.id, { color: parseInt(picker.value.slice(1), 16) }));
    const off = element("button", { type: "button", className: "off", textContent: "off", attrs: { "aria-label": `${labelOf(node)} off` } });
    off.addEventListener("click", () => setValues(node.id, { color: 0 }));
    return element("div", { className: "control" }, picker, off);
  }
  if (node.type === "thermostat" || node.type === "sensor_temp") {
    const temperature = reading(node, "temperature");
    const parts = [element("span", { className: "reading", textContent: temperature ? `${temperature.value} °C` : "–" }),
                   element("span", { className: "trend", textContent: trendOf(node), attrs: { "aria-label": trendName(node) } })];
    // `at` is when the value was first read as it is: later reads (every 30 s) found it unchanged.
    if (temperature && temperature.at) parts.push(element("span", { className: "read-at", textContent: ` since ${clock(temperature.at)}`,
      attrs: { title: `${temperature.value} °C since ${clock(temperature.at)}: read again since, unchanged` } }));
    if (node.type === "thermostat") {
      const target = element("input", { type: "number", className: "target", min: 5, max: 35, step: 1,
        value: values.target ?? "", attrs: { "aria-label": `target of ${labelOf(node)}` } });
      const set = element("button", { type: "button", className: "set-target", textContent: "set target" });
      set.addEventListener("click", () => setValues(node.id, { target: Number(target.value) }));
      parts.push(element("label", { className: "target-label" }, "target ", target, " °C"), set);
    }
    return element("div", { className: "control" }, ...parts);
  }
  // Any other node: its values, and a key and value to set.
  const key = element("input", { className: "value", placeholder: "key", attrs: { "aria-label": `key for ${node.id}` } });
  const value = element("input", { className: "value", placeholder: "value", attrs: { "aria-label": `value for ${node.id}` } });
  const send = element("button", { type: "button", textContent: "set" });
  send.addEventListener("click", () => {
    const number = Number(value.value);
    setValues(node.id, { [key.value]: value.value.trim() !== "" && Number.isInteger(number) ? number : value.value });
  });
  const shown = Object.entries(values).map(([k, v]) => `${k}=${v}`).join(" ");
  return element("div", { className: "control" }, element("span", { className: "values", textContent: shown }), key, value, send);
}

// A temperature's trend: from the change before the current value (seen since the page loaded).
state.previous = new Map();
function trendOf(node) {
  const before = state.previous.get(node.id), now = reading(node, "temperature");
  if (before == null || !now) return "";
  return now.value > before ? "↑" : now.value < before ? "↓" : "→";
}
function trendName(node) {
  return { "↑": "rising", "↓": "falling", "→": "steady" }[trendOf(node)] || "no trend yet";
}

function updateNode(data) {
  const known = state.nodes.get(data.id);
  const was = known && reading(known, "temperature"), now = reading(data, "temperature");
  if (was && now && was.value !== now.value) state.previous.set(data.id, was.value);
  state.nodes.set(data.id, data);
  renderNodes();
}

function refreshSeen() {
  const now = Date.now() / 1000;
  for (const card of $("#nodes").children) {
    const node = state.nodes.get(Number(card.dataset.id));
    if (!node) continue;
    const seen = card.querySelector(".seen");
    if (node.state === "offline") {
      seen.textContent = `since ${clock(node.since)}: no beacon since ${clock(node.last_seen)}`;
    } else if (node.last_seen) seen.textContent = `seen ${ago(now - node.last_seen)}`;
  }
}
setInterval(refreshSeen, 5000);

$("#nodes").addEventListener("focusout", () => {
  if (state.renderLater) { state.renderLater = false; setTimeout(renderNodes); }
});

async function rename(id, name) {
  try { await api("POST", `/nodes/id/${id}`, { name }); } catch (error) { alert(error.message); }
}

async function setValues(id, values) {
  try { await api("POST", `/nodes/id/${id}/set`, values); } catch (error) { alert(error.message); }
}

function renderNodePicker() {
  const picker = $("#run-node"), chosen = picker.value;
  // Every node: a named one by its name, an unnamed one by its id (scripts take either).
  const key = (n) => n.name || String(n.id);
  const nodes = [...state.nodes.values()].sort((a, b) => key(a).localeCompare(key(b), undefined, { numeric: true }));
  picker.replaceChildren(new Option("(none)", ""), ...nodes.map((n) => new Option(`${key(n)} (${n.type})`, key(n))));
  picker.value = nodes.some((n) => key(n) === chosen) ? chosen : "";
  renderBuilderChoices();
}

// --- a node's history: a chart of its value and its availability strip ----------------------------

state.history = { node: null, range: 86400 };

async function openHistory(nodeId) {
  state.history.node = nodeId;
  if (!$("#history").open) $("#history").showModal();
  await drawHistory();
}

async function drawHistory() {
  const node = state.nodes.get(state.history.node);
  if (!node) return;
  const key = CHART_KEY[node.type];
  const until = Date.now() / 1000, since = until - state.history.range;
  $("#history-title").textContent = `${labelOf(node)}${key ? " — " + key : ""}`;
  for (const button of document.querySelectorAll("#history .ranges button")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.range) === state.history.range));
  }
  const query = new URLSearchParams({ since, until });
  if (key) query.set("key", key);
  const history = await api("GET", `/nodes/id/${node.id}/history?${query}`);
  const points = history.points || [];
  // Raw points [t, value]; buckets [t, low, mean, high, count]: the mean is drawn.
  const xs = points.map((p) => p[0]), ys = points.map((p) => (p.length === 2 ? p[1] : p[2]));
  if (history.before) { xs.unshift(since); ys.unshift(history.before[1]); }  // the value in effect at the start
  if (ys.length && !history.step) { xs.push(until); ys.push(ys.at(-1)); }  // and it holds until now
  drawChart([xs, ys], key || "", since, until);
  $("#chart").dataset.points = String(points.length);
  $("#history-summary").textContent = !key ? "" : points.length
    ? `${points.length} ${history.step ? `buckets of ${history.step} s` : "readings"}, last ${points.at(-1).length === 2 ? points.at(-1)[1] : points.at(-1)[2]}`
    : "no readings in this range";
  drawAvailability(history.availability, since, until);
}

function drawChart(data, label, since, until) {
  const width = Math.min(720, $("#history").clientWidth - 40);
  const options = {
    width, height: 220, scales: { x: { time: true, min: since, max: until } },
    // A raw value holds until the next one: steps, not slopes.
    series: [{}, { label, stroke: "#1565c0", width: 2, points: { show: data[0].length < 200 },
                   paths: uPlot.paths.stepped({ align: 1 }) }],
    axes: [{}, { size: 50 }],
  };
  if (state.chart) state.chart.destroy();
  state.chart = new uPlot(options, data, $("#chart"));
  window.hacerChart = state.chart;  // for tests: what is drawn
}

function drawAvailability(changes, since, until) {
  const strip = $("#availability");
  const spans = [];
  const said = [];
  const presence = changes.filter((c) => c.state === "online" || c.state === "offline");
  const known = presence.length ? Math.max(presence[0].t, since) : until;
  if (known > since) {  // before the first change in range: not known
    const unknown = element("span", { className: "state-unknown" });
    unknown.style.width = `${(100 * (known - since)) / (until - since)}%`;
    spans.push(unknown);
  }
  presence.forEach((change, index) => {
    const start = Math.max(change.t, since), end = index + 1 < presence.length ? presence[index + 1].t : until;
    if (end <= since) return;
    const span = element("span", { className: `state-${change.state}`, title: `${change.state} from ${new Date(start * 1000).toLocaleString()}` });
    span.style.width = `${(100 * (end - start)) / (until - since)}%`;
    spans.push(span);
    said.push(`${change.state} from ${new Date(start * 1000).toLocaleString()}`);
  });
  const silent = changes.filter((c) => c.state === "not_answering" && c.t >= since).length;
  strip.replaceChildren(...spans);
  strip.setAttribute("aria-label", said.length ? `availability: ${said.join("; ")}${silent ? `; stopped answering ${silent} time(s)` : ""}` : "availability unknown");
}

for (const button of document.querySelectorAll("#history .ranges button")) {
  button.addEventListener("click", () => { state.history.range = Number(button.dataset.range); drawHistory(); });
}
$("#history-close").addEventListener("click", () => $("#history").close());

async function loadScripts() {
  const { script_list } = await api("GET", "/scripts/list");
  state.scriptNames = script_list.map((s) => s.name);
  $("#script").replaceChildren(...script_list.map((s) => new Option(s.name, s.name)));
  for (const picker of document.querySelectorAll("#builder .script-choice")) {
    const chosen = picker.value;
    picker.replaceChildren(...script_list.map((s) => new Option(s.name, s.name)));
    if (script_list.some((s) => s.name === chosen)) picker.value = chosen;
  }
}

// Runs: history from REST, kept current by run events (the database may lag the bus a little).
const finished = (runState) => runState && !["queued", "running"].includes(runState);

async function loadRuns() {
  const query = new URLSearchParams({ per_page: 20 });
  if ($("#filter-state").value) query.set("state", $("#filter-state").value);
  if ($("#filter-script").value.trim()) query.set("script", $("#filter-script").value.trim());
  const { runs } = await api("GET", `/runs?${query}`);
  if (query.has("state") || query.has("script")) state.runs = new Map();  // a filtered view: only these
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

$("#filter-state").addEventListener("change", () => { state.runs = new Map(); loadRuns(); });
$("#filter-script").addEventListener("change", () => { state.runs = new Map(); loadRuns(); });
$("#run-filters").addEventListener("submit", (event) => event.preventDefault());

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
    const actions = row.insertCell();
    const log = element("button", { type: "button", textContent: "log", attrs: { "aria-label": `log of run ${run.thread_id}` } });
    log.addEventListener("click", () => showLog(run.run_id, run.thread_id));
    actions.append(log);
    if (!finished(run.state)) {
      const cancel = element("button", { type: "button", className: "cancel", textContent: "cancel",
                                         attrs: { "aria-label": `cancel run ${run.thread_id}` } });
      cancel.addEventListener("click", () => api("POST", `/runs/${run.run_id}/cancel`).catch((error) => alert(error.message)));
      actions.append(cancel);
    }
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
  const params = [$("#run-node").value, ...$("#params").value.trim().split(/\s+/)].filter(Boolean);
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
    case "presence": return `node ${t.node} goes ${t.becomes}` + (t.for ? ` for ${t.for} s` : "");
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
    if (automation.failure) cell(row, `failed: ${automation.failure}`, "failed");
    else cell(row, enabled ? localTime(automation.next_fires[0]) : "");
    const fired = state.lastFires.get(id) || automation.last_runs[0];
    cell(row, fired ? `${localTime(fired.due)}${fired.state ? " " + fired.state : ""}` : "", "last-fire");
    const toggle = document.createElement("button");
    toggle.textContent = enabled ? "on" : "off";
    toggle.className = enabled ? "on" : "off";
    toggle.addEventListener("click", () => changeAutomation("POST", `/automations/${id}/${enabled ? "disable" : "enable"}`));
    row.insertCell().append(toggle);
    const traces = element("button", { type: "button", textContent: "traces", attrs: { "aria-label": `traces of ${name}` } });
    traces.addEventListener("click", () => openTraces(id));
    row.insertCell().append(traces);
    const remove = document.createElement("button");
    remove.textContent = "delete";
    remove.addEventListener("click", () => confirm(`Delete ${name}?`) && changeAutomation("DELETE", `/automations/${id}`));
    row.insertCell().append(remove);
  }
}

// An automation's traces: what triggered each fire, what its conditions saw, what its run did.
state.traces = null;  // the automation whose traces are open

function describeCause(cause) {
  if (!cause) return "fired before traces were kept";
  const json = JSON.stringify;
  switch (cause.kind) {
    case "time": return "its time came";
    case "presence": return `node ${cause.node} ${cause.state} since ${localTime(cause.since)}` + (cause.for ? `, for ${cause.for} s` : "");
    case "value": return `node ${cause.node} ${cause.key} ${json(cause.value)}` + ("before" in cause ? ` (was ${json(cause.before)})` : "")
      + (cause.for ? `, past its threshold since ${localTime(cause.since)}, for ${cause.for} s` : "");
    case "run": return cause.for ? `no run of ${cause.script} ended otherwise than ${cause.states.join("/")} since ${localTime(cause.since)}, for ${cause.for} s`
      : `run ${cause.run_id} of ${cause.script} ended ${cause.state}`;
    default: return cause.kind;
  }
}

const HELD_BECAUSE = {
  conditions: "not run: a condition did not hold",
  cooldown: "not run: within its cooldown",
  single: "not run: its last run was still going (mode single)",
  "queue full": "not run: 10 fires waited already (mode queued)",
};

function describeCondition({ condition: c, seen, held }) {
  const what = c.kind === "time" ? `time ${c.after}–${c.before}${c.tz !== "UTC" ? ` (${c.tz})` : ""}`
    : c.kind === "presence" ? `node ${c.node} ${c.state}`
    : `node ${c.node} ${c.key}` + (c.equals != null ? ` = ${c.equals}` : c.below != null ? ` < ${c.below}` : ` > ${c.above}`);
  return `${held ? "✓" : "✗"} ${what}: saw ${JSON.stringify(seen)}`;
}

// A step other than a run, as its trace says it went: what it was (from the definition it fired
// with), its state, and what came of it (the node's results, the value its condition saw).
function describeStep(step, definition) {
  const spec = definition?.steps?.[step.position] ?? {};
  const when = step.state === "waiting" && step.due_at ? ` until ${localTime(step.due_at)}` : "";
  if (step.kind === "set") {
    const { node, ...values } = spec.set ?? {};
    const results = (step.results ?? []).map((r) => `${r.key} ${r.ok ? "ok" : r.error ?? "failed"}`).join(", ");
    return `set node ${node} ${JSON.stringify(values)}: ${step.state}${results ? ` (${results})` : ""}`;
  }
  if (step.kind === "wait") return `wait ${spec.wait} s: ${step.state}${when}`;
  const seen = step.seen ? ` (${describeCondition(step.seen)})` : "";
  return `wait for a condition: ${step.state}${when}${seen}`;
}

async function openTraces(id) {
  state.traces = id;
  if (!$("#traces").open) $("#traces").showModal();
  await loadTraces();
}

async function loadTraces() {
  const id = state.traces;
  if (id == null) return;
  $("#traces-title").textContent = `${state.automations.get(id)?.name ?? id}: what triggered it`;
  const { traces } = await api("GET", `/automations/${id}/traces?limit=20`);
  const list = $("#trace-list");
  list.replaceChildren(...(traces.length ? [] : [element("li", { textContent: "not triggered yet" })]));
  for (const trace of traces) {
    const item = element("li", { className: "trace" },
      element("p", { className: "trigger", textContent: `${localTime(trace.due)}${trace.late ? " (late)" : ""}: ${describeCause(trace.trigger)}` }),
      ...trace.conditions.map((condition) =>
        element("p", { className: "condition " + (condition.held ? "held" : "not-held"), textContent: describeCondition(condition) })));
    if (trace.outcome === "held back") {
      item.append(element("p", { className: "held-back", textContent: HELD_BECAUSE[trace.why] ?? `not run: ${trace.why}` }));
    }
    for (const step of trace.steps) {
      if (step.kind !== "run") {
        item.append(element("p", { className: `step state-${step.state}`, textContent: describeStep(step, trace.definition) }));
        continue;
      }
      const log = element("button", { type: "button", textContent: "log", attrs: { "aria-label": `log of ${step.run_id}` } });
      log.addEventListener("click", () => { $("#traces").close(); watch(step.run_id); });
      const exit = step.exit_code != null ? ` (exit ${step.exit_code})` : "";
      item.append(element("p", { className: `step state-${step.state}`, textContent: `run ${step.run_id}: ${step.state}${exit} ` }, log));
    }
    list.append(item);
  }
}

let tracesReload = null;
function reloadTracesSoon(runId) {  // a fire of the open automation, or a run of one of its fires, moved
  if (state.traces == null || (runId && !runId.startsWith(`auto-${state.traces}-`))) return;
  clearTimeout(tracesReload);
  tracesReload = setTimeout(loadTraces, 200);
}

$("#traces-close").addEventListener("click", () => $("#traces").close());
$("#traces").addEventListener("close", () => { state.traces = null; });

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

// --- the automation builder: a form that makes the JSON, checked and previewed by the api ---------

const builder = $("#builder");
const ZONE = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
for (const zone of builder.querySelectorAll(".zone")) zone.value = ZONE;

function showKind() {
  for (const fieldset of builder.querySelectorAll("fieldset[data-kind]")) {
    const shown = fieldset.dataset.kind === builder.elements.kind.value;
    fieldset.hidden = !shown;
    fieldset.disabled = !shown;
  }
}

function builtDefinition() {
  const f = builder.elements, number = (name) => Number(f[name].value || 0);
  const kind = f.kind.value, trigger = { kind };
  if (kind === "cron") Object.assign(trigger, { cron: f.cron.value.trim(), tz: f["cron-tz"].value.trim() || "UTC" });
  if (kind === "every") trigger.seconds = number("seconds");
  if (kind === "sun") Object.assign(trigger, { event: f.event.value, offset: number("offset"), tz: f["sun-tz"].value.trim() || "UTC" });
  if (kind === "presence") Object.assign(trigger, { node: number("presence-node"), becomes: f.becomes.value });
  if (kind === "value") {
    Object.assign(trigger, { node: number("value-node"), key: f.key.value });
    if (f.compare.value !== "changes") trigger[f.compare.value] = number("threshold");
  }
  if (kind === "run") Object.assign(trigger, { script: f["run-script"].value, states: f.ended.value.split(" ") });
  const lasting = { presence: "presence-for", value: "value-for", run: "run-for" }[kind];
  if (lasting && number(lasting) > 0) trigger.for = number(lasting);
  const definition = { name: f.name.value.trim(), trigger };
  if (f.then.value === "steps") definition.steps = [...$("#builder-steps").children].map(builtStep);
  else Object.assign(definition, { script: f.script.value, params: words(f.params.value) });
  if (f.after.value || f.before.value) definition.conditions = [{ kind: "time", after: f.after.value, before: f.before.value, tz: ZONE }];
  return definition;
}

const words = (text) => text.split(/\s+/).filter(Boolean);
const nodeValue = (text) => (text.trim() !== "" && !Number.isNaN(Number(text)) ? Number(text) : text);

// --- its steps: a row each, the fields its kind needs; each field names its path for the api's errors

function builtStep(row) {
  const field = (name) => row.querySelector(`.step-${name}`).value;
  const kind = field("kind");
  if (kind === "set") return { set: { node: Number(field("node")), [field("key")]: nodeValue(field("value")) } };
  if (kind === "run") return { run: { script: field("script"), params: words(field("params")) } };
  if (kind === "wait") return { wait: Number(field("seconds") || 0) };
  const timeout = Number(field("timeout") || 0);
  if (kind === "wait_presence") return { wait_for: { condition: { kind: "presence", node: Number(field("node")), state: field("state") }, timeout } };
  const compare = field("compare"), value = field("value");
  const condition = { kind: "value", node: Number(field("node")), key: field("key"), [compare]: compare === "equals" ? nodeValue(value) : Number(value) };
  return { wait_for: { condition, timeout } };
}

const STEP_PATHS = {  // a field's path in the definition, by the step's kind (`$.steps[i]` before it)
  set: { node: ".set.node", key: ".set", value: ".set" },
  wait_for: { node: ".wait_for.condition.node", key: ".wait_for.condition.key", value: ".wait_for.condition", timeout: ".wait_for.timeout" },
  wait_presence: { node: ".wait_for.condition.node", state: ".wait_for.condition.state", timeout: ".wait_for.timeout" },
  run: { script: ".run.script", params: ".run.params" },
  wait: { seconds: ".wait" },
};

function numberSteps() {
  [...$("#builder-steps").children].forEach((row, index) => {
    const kind = row.querySelector(".step-kind").value;
    row.querySelector(".step-kind").dataset.path = `$.steps[${index}]`;
    for (const span of row.querySelectorAll("[data-step]")) {
      const shown = span.dataset.step.split(" ").includes(kind);
      span.hidden = !shown;
      for (const field of span.querySelectorAll("input, select")) field.disabled = !shown;
    }
    row.querySelector(".step-keys").id = `step${index}-keys`;
    row.querySelector(".step-key").setAttribute("list", `step${index}-keys`);
    for (const field of row.querySelectorAll("input, select")) {
      const name = [...field.classList].find((c) => c.startsWith("step-")).slice(5);
      field.name = `step${index}-${name}`;
      const path = STEP_PATHS[kind][name];
      if (path) field.dataset.path = `$.steps[${index}]${path}`;
      else if (name !== "kind") delete field.dataset.path;
    }
  });
}

function addStep(kind) {
  const row = $("#step-template").content.firstElementChild.cloneNode(true);
  row.querySelector(".step-kind").value = kind;
  row.querySelector(".step-script").replaceChildren(...state.scriptNames.map((name) => new Option(name, name)));
  row.querySelector(".step-kind").addEventListener("change", numberSteps);
  row.querySelector(".step-node").addEventListener("change", () => renderKeyChoice());
  row.querySelector(".remove-step").addEventListener("click", () => { row.remove(); numberSteps(); previewDefinition(); });
  $("#builder-steps").append(row);
  renderBuilderChoices();
  numberSteps();
}

function showThen() {
  for (const fieldset of builder.querySelectorAll("fieldset[data-then]")) {
    const shown = fieldset.dataset.then === builder.elements.then.value;
    fieldset.hidden = !shown;
    fieldset.disabled = !shown;
  }
  if (builder.elements.then.value === "steps" && !$("#builder-steps").children.length) addStep("set");
}

function clearFieldErrors() {
  for (const error of builder.querySelectorAll(".field-error")) error.remove();
  for (const field of builder.querySelectorAll("[aria-invalid]")) { field.removeAttribute("aria-invalid"); field.removeAttribute("aria-errormessage"); }
  $("#builder-error").textContent = "";
}

// The api names the field at fault (`... - at `$.trigger.cron``): its message goes next to that field.
function showError(message) {
  const path = /at `([^`]+)`/.exec(message)?.[1];
  const fields = [...builder.querySelectorAll("[data-path]")].filter((field) => !field.disabled && !field.closest("fieldset:disabled"));
  const field = path && (fields.find((f) => f.dataset.path === path) || fields.find((f) => path.startsWith(f.dataset.path + ".") || path.startsWith(f.dataset.path + "[")));
  if (!field) { $("#builder-error").textContent = message; return; }
  const error = element("span", { className: "field-error", id: `error-${field.name}`, textContent: message.replace(/^bad automation: /, "") });
  field.closest("label").after(error);  // beside the field, outside its label: its name stays its own
  field.setAttribute("aria-invalid", "true");
  field.setAttribute("aria-errormessage", error.id);
}

let previewing = null;
async function previewDefinition() {
  const definition = builtDefinition();
  $("#automation-definition").value = JSON.stringify(definition);  // the JSON it makes, to see or copy
  const asked = previewing = Symbol();
  let answer, failure;
  try { answer = await api("POST", "/automations/preview", definition); } catch (error) { failure = error; }
  if (asked !== previewing) return;  // a later change asked again
  clearFieldErrors();
  if (failure) { $("#builder-preview").replaceChildren(); showError(failure.message); return; }
  $("#builder-preview").replaceChildren(answer.next_fires.length
    ? element("p", { textContent: "next fires:" }, element("ol", {}, ...answer.next_fires.map((due) => element("li", { textContent: localTime(due) }))))
    : element("p", { textContent: "fires when that happens (no set times)" }));
}

let previewSoon = null;
builder.addEventListener("input", () => { clearTimeout(previewSoon); previewSoon = setTimeout(previewDefinition, 300); });
builder.elements.kind.addEventListener("change", showKind);
builder.elements.then.addEventListener("change", showThen);
$("#add-step").addEventListener("click", () => { addStep("wait"); previewDefinition(); });
builder.elements["value-node"].addEventListener("change", renderKeyChoice);
builder.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearFieldErrors();
  try {
    await api("POST", "/automations", builtDefinition());
    builder.elements.name.value = "";
    $("#builder-error").textContent = "";
    loadAutomations();
  } catch (error) { showError(error.message); }
});

function renderBuilderChoices() {
  for (const picker of builder.querySelectorAll(".node-choice")) {
    const chosen = picker.value;
    const nodes = [...state.nodes.values()].sort((a, b) => a.id - b.id);
    picker.replaceChildren(...nodes.map((n) => new Option(`${labelOf(n)} (${n.id})`, String(n.id))));
    if (nodes.some((n) => String(n.id) === chosen)) picker.value = chosen;
  }
  renderKeyChoice();
}

// Each key picker offers the keys its node is known to have: the trigger's a choice, a step's a
// suggestion (a node's keys are known once read; a `set` may name one not read yet).
function renderKeyChoice() {
  const pairs = [[builder.elements["value-node"], builder.elements.key],
    ...[...$("#builder-steps").children].map((row) => [row.querySelector(".step-node"), row.querySelector(".step-keys")])];
  for (const [nodePicker, picker] of pairs) {
    const chosen = picker.value, node = state.nodes.get(Number(nodePicker.value));
    const keys = Object.keys({ ...(node?.values || {}), ...(node?.readings || {}) }).sort();
    picker.replaceChildren(...keys.map((key) => new Option(key, key)));
    if (keys.includes(chosen)) picker.value = chosen;
  }
}

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
  if (event.kind === "node") updateNode(data);
  else if (event.kind === "lastseen") {
    for (const [id, t] of Object.entries(data)) { const node = state.nodes.get(Number(id)); if (node) node.last_seen = t; }
    refreshSeen();
  }
  else if (event.kind === "node_removed") { state.nodes.delete(data.id); renderNodes(); }
  else if (event.kind === "bridge") showBridge(data.state);
  else if (event.kind === "runner") showRunners([data]);
  else if (event.kind === "run") { updateRun(data); reloadTracesSoon(data.run_id); }
  else if (event.kind === "automation_fired") {
    state.lastFires.set(data.id, data);
    renderAutomations();
    if (data.id === state.traces) reloadTracesSoon();
  }
  else if (event.kind === "automation_held" || event.kind === "automation_step") {
    if (data.id === state.traces) reloadTracesSoon();
  }
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
