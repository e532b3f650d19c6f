// The Shoal dashboard: polls the gateway's JSON API about once a second (not while
// the tab is hidden) and renders the cluster, queues, tasks, dead letters and agents.

import { ApiError, apiKey, get, post, setApiKey } from "./api.js";
import { draw } from "./charts.js";
import { TaskDetail } from "./detail.js";
import { clock, h, ms, rate, show } from "./dom.js";
import { Metrics, WINDOW_S } from "./metrics.js";
import { sagaRows, sagaTasks } from "./sagas.js";
import * as views from "./views.js";

const POLL_MS = 1000;
const SLOW_EVERY = 3; // failures, dead letters and agents: every 3rd poll
const FAILURES_LIMIT = 50;
const DEAD_LETTERS_LIMIT = 50;
const AGENTS_LIMIT = 200;
const SAGAS_LIMIT = 50;
const MESSAGE_MS = 60_000; // how long a redrive's outcome stays on screen
const TASK_STATUSES = ["scheduled", "queued", "running", "cancelled", "dead", "expired", "failed", "succeeded"];

const $ = (id) => document.getElementById(id);
const metrics = new Metrics();
const colors = new views.NodeColors();
const detail = new TaskDetail($("detail"));
const state = {
  polls: 0,
  timer: null,
  cluster: null,
  agentTypes: [],
  deadLetters: new Map(), // capability -> {entries, count, message, stale}
  showIdle: localStorage.getItem("shoal.dashboard.showIdle") === "1",
  keyPanelWanted: false, // opened with the "API key" button, not by a 401
};
const openTask = (id) => detail.open(id);

// --- polling ------------------------------------------------------------------------

async function poll() {
  clearTimeout(state.timer);
  state.timer = null;
  if (document.hidden) return setConnection("paused", "paused while the tab is hidden");
  const slow = state.polls++ % SLOW_EVERY === 0;
  const results = await Promise.allSettled([
    loadCluster(slow),
    loadTasks(),
    slow ? loadFailures() : null,
    slow ? loadAgents() : null,
    slow ? loadSagas() : null,
    detail.isOpen ? detail.refresh().catch(() => null) : null, // shown in the panel
  ]);
  report(results.filter((r) => r.status === "rejected").map((r) => r.reason));
  if (document.hidden) setConnection("paused", "paused while the tab is hidden");
  else if (state.timer === null) state.timer = setTimeout(poll, POLL_MS);
}

function report(errors) {
  const unauthorized = errors.find((e) => e instanceof ApiError && e.status === 401);
  $("key-panel").hidden = !unauthorized && !state.keyPanelWanted;
  if (unauthorized) {
    $("key-message").textContent = unauthorized.message;
    setConnection("unauthorized", apiKey() ? "the API key was refused" : "an API key is needed");
    return showError(null);
  }
  $("key-message").textContent = "";
  if (!errors.length) {
    setConnection("live", "connected");
    $("updated").textContent = `updated ${clock(Date.now())}`;
    return showError(null);
  }
  const offline = errors.every((e) => e instanceof ApiError && e.status === 0);
  setConnection(offline ? "offline" : "error", offline ? "gateway unreachable" : "the API answered with an error");
  showError(errors.map((e) => (e instanceof ApiError ? e.text : String(e))));
}

function setConnection(kind, title) {
  const el = $("connection");
  el.textContent = kind;
  el.className = `pill pill-${kind}`;
  el.title = title;
}

function showError(messages) {
  const banner = $("error");
  banner.hidden = !messages;
  if (messages) banner.replaceChildren(...[...new Set(messages)].map((m) => h("div", {}, m)));
}

// --- loaders: fetch, remember, render -------------------------------------------------

async function loadCluster(slow) {
  const cluster = await get("v1/cluster");
  state.cluster = cluster;
  metrics.addCluster(cluster);
  header(cluster);
  $("summary").replaceChildren(...views.summary(cluster, metrics));
  show($("nodes-body"), { nodes: cluster.nodes, rates: cluster.nodes.map((n) => rate(metrics.throughput(10, n.id))) },
    () => views.nodes(cluster, metrics, colors));
  renderQueues();
  capabilityOptions(cluster);
  renderCharts();
  const agentTypesLoaded = slow ? get("v1/agent-types").then((infos) => (state.agentTypes = infos)) : null;
  await Promise.all([loadDeadLetters(cluster, slow), agentTypesLoaded]);
  show($("agent-types-body"), { types: cluster.agent_types, infos: state.agentTypes },
    () => views.agentTypes(cluster.agent_types, state.agentTypes, colors));
  show($("ownership-log"), cluster.ownership, (changes) => views.ownershipLog(changes, colors));
}

function header(cluster) {
  // group 0's hash tag is the namespace itself (shoal.keys.group_tags)
  const group0 = cluster.key_groups.find((g) => g.group === 0);
  $("namespace").textContent = group0 ? group0.tag : "–";
  const versions = [...new Set(cluster.nodes.map((n) => n.version).filter(Boolean))];
  $("node-versions").textContent = versions.join(", ") || "–";
}

function renderQueues() {
  const { rows, hidden } = views.queues(state.cluster, metrics, state.showIdle);
  $("queues-body").replaceChildren(...rows);
  $("queues-hidden").textContent = hidden ? `${hidden} idle queue${hidden > 1 ? "s" : ""} hidden` : "";
}

function renderCharts() {
  const now = Date.now();
  const throughput = metrics.throughputSeries();
  const current = metrics.throughput();
  $("throughput-now").textContent = current === null ? "" : `${rate(current)} tasks/s now (10 s)`;
  draw($("throughput-chart"), {
    window: WINDOW_S, now, minTop: 1, format: (v) => rate(v), empty: "collecting samples…", marks: [],
    series: [{ points: throughput, kind: "line", color: "--accent" }],
  });
  const latency = metrics.latency();
  $("latency-now").textContent = latency.count
    ? `p50 ${ms(latency.p50 * 1000)} · p95 ${ms(latency.p95 * 1000)} · ${latency.count} tasks` : "";
  draw($("latency-chart"), {
    window: WINDOW_S, now, minTop: 0.01, format: (v) => ms(v * 1000), empty: "no finished tasks seen yet",
    series: [{ points: latency.points, kind: "dots", color: "--accent" }],
    marks: [
      { y: latency.p50, label: "p50", color: "--ok", align: "left" },
      { y: latency.p95, label: "p95", color: "--warn" },
    ],
  });
}

async function loadTasks() {
  const status = $("task-status").value;
  const capability = $("task-capability").value;
  const limit = Number($("task-limit").value);
  const page = await get("v1/tasks", { status, capability, limit });
  metrics.addTasks(page.tasks);
  const live = page.tasks.some((t) => !t.finished_at);
  show($("tasks-body"), { tasks: page.tasks, now: live ? Date.now() : 0 },
    () => views.tasks(page.tasks, openTask, status || capability ? "No task matches." : "No tasks yet."));
  $("tasks-count").textContent = `${page.tasks.length} shown${page.next ? ", more are older" : ""}`;
}

/** The newest failed and dead tasks. A filtered listing reads a bounded number of the
 * newest tasks (20 per task asked for), so older failures may not be found. */
async function loadFailures() {
  const pages = await Promise.all(["failed", "dead"].map((status) =>
    get("v1/tasks", { status, limit: FAILURES_LIMIT })));
  const list = pages.flatMap((p) => p.tasks).sort((a, b) => (a.id < b.id ? 1 : -1)).slice(0, FAILURES_LIMIT);
  const partial = pages.some((p) => p.next !== null && p.tasks.length < FAILURES_LIMIT);
  show($("failures-body"), { list, partial }, () => views.failures(list, openTask, partial));
}

async function loadAgents() {
  const list = await get("v1/agents", { limit: AGENTS_LIMIT });
  show($("agents-body"), list, () => views.agents(list, AGENTS_LIMIT));
  $("agents-count").textContent = `${list.length}${list.length >= AGENTS_LIMIT ? "+" : ""}`;
}

async function loadSagas() {
  const list = await get("v1/sagas", { limit: SAGAS_LIMIT });
  detail.sagaOf = sagaTasks(list);
  show($("sagas-body"), list, () => sagaRows(list, openTask));
  $("sagas-count").textContent = list.length ? `${list.length}${list.length >= SAGAS_LIMIT ? "+" : ""}` : "";
}

/** Dead letters of each capability that has some: on slow polls, or when a count changed. */
async function loadDeadLetters(cluster, slow) {
  const counts = views.deadLetterCounts(cluster);
  for (const [capability, group] of state.deadLetters) {
    if (group.message && Date.now() - group.message.at > MESSAGE_MS) group.message = null;
    if (!counts.has(capability) && !group.message) state.deadLetters.delete(capability);
  }
  await Promise.all([...counts].map(async ([capability, count]) => {
    const group = state.deadLetters.get(capability);
    if (!slow && group && !group.stale && group.count === count) return;
    const entries = await get(`v1/dead-letters/${encodeURIComponent(capability)}`, { limit: DEAD_LETTERS_LIMIT });
    state.deadLetters.set(capability, { entries, count, message: group ? group.message : null });
  }));
  renderDeadLetters();
}

function renderDeadLetters() {
  const letters = [...state.deadLetters].sort(([a], [b]) => a.localeCompare(b));
  show($("dead-letters"), letters, () => views.deadLetters(letters, openTask, redrive));
}

async function redrive(capability, taskIds) {
  const group = state.deadLetters.get(capability) ?? { entries: [], count: 0, message: null };
  state.deadLetters.set(capability, group);
  try {
    const body = taskIds ? { task_ids: taskIds } : {};
    const { task_ids: done } = await post(`v1/dead-letters/${encodeURIComponent(capability)}/redrive`, body);
    group.message = { kind: "ok", at: Date.now(), text: `Redriven: ${done.length} task${done.length === 1 ? "" : "s"} queued again.` };
  } catch (error) {
    group.message = { kind: "bad", at: Date.now(), text: error instanceof ApiError ? error.text : String(error) };
  }
  group.stale = true; // the list changed: fetch it again at the next poll
  renderDeadLetters();
  poll();
}

function capabilityOptions(cluster) {
  const select = $("task-capability");
  const names = [...new Set(cluster.queues.map((q) => q.capability))].sort();
  const current = [...select.options].slice(1).map((o) => o.value);
  if (JSON.stringify(names) === JSON.stringify(current)) return;
  const chosen = select.value;
  select.replaceChildren(h("option", { value: "" }, "all capabilities"), ...names.map((n) => h("option", { value: n }, n)));
  select.value = names.includes(chosen) ? chosen : "";
}

// --- controls -----------------------------------------------------------------------

function setup() {
  $("task-status").replaceChildren(h("option", { value: "" }, "all statuses"),
    ...TASK_STATUSES.map((s) => h("option", { value: s }, s)));
  for (const id of ["task-status", "task-capability", "task-limit"]) $(id).addEventListener("change", poll);
  $("show-idle").checked = state.showIdle;
  $("show-idle").addEventListener("change", (e) => {
    state.showIdle = e.target.checked;
    localStorage.setItem("shoal.dashboard.showIdle", state.showIdle ? "1" : "0");
    if (state.cluster) renderQueues();
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey($("key-input").value.trim());
    $("key-input").value = "";
    state.keyPanelWanted = false;
    keyState();
    poll();
  });
  $("key-forget").addEventListener("click", () => {
    setApiKey("");
    keyState();
    poll();
  });
  $("key-button").addEventListener("click", () => {
    state.keyPanelWanted = $("key-panel").hidden;
    $("key-panel").hidden = !state.keyPanelWanted;
    if (state.keyPanelWanted) $("key-input").focus();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) poll();
    else setConnection("paused", "paused while the tab is hidden");
  });
  window.addEventListener("resize", () => state.cluster && renderCharts());
  keyState();
  fetch("openapi.json").then((r) => r.json()).then((doc) => ($("version").textContent = doc.info.version))
    .catch(() => ($("version").textContent = "?"));
  poll();
}

function keyState() {
  $("key-button").textContent = apiKey() ? "API key ✓" : "API key";
  $("key-forget").hidden = !apiKey();
}

setup();
