// Renderers: data from the API (and derived rates) in, DOM out. No fetching here.

import { bytes, clock, emptyRow, h, ms, pill, rate, row, seconds, shortId } from "./dom.js";
import { queueKey } from "./metrics.js";

const PALETTE_SIZE = 8;

/** A stable colour per node id: its index among the ids seen, on a small palette. */
export class NodeColors {
  constructor() {
    this.index = new Map();
  }

  swatch(id) {
    if (!this.index.has(id)) this.index.set(id, this.index.size % PALETTE_SIZE);
    return h("span", { class: `swatch n${this.index.get(id)}`, "aria-hidden": "true" });
  }

  klass(id) {
    this.swatch(id);
    return `n${this.index.get(id)}`;
  }
}

/** Dead letters per capability. The dead-letter queue is one per capability, and
 * every priority's queue reports its length: count it once. */
export function deadLetterCounts(cluster) {
  const counts = new Map();
  for (const q of cluster.queues) {
    if (q.dead_letters) counts.set(q.capability, Math.max(counts.get(q.capability) || 0, q.dead_letters));
  }
  return counts;
}

export function summary(cluster, metrics) {
  const count = (state) => cluster.nodes.filter((n) => n.state === state).length;
  const alive = cluster.nodes.filter((n) => n.state !== "dead");
  const inFlight = alive.reduce((sum, n) => sum + n.in_flight, 0);
  const capacity = alive.reduce((sum, n) => sum + n.concurrency, 0);
  const waiting = cluster.queues.reduce((sum, q) => sum + q.waiting, 0);
  const dead = [...deadLetterCounts(cluster).values()].reduce((sum, n) => sum + n, 0);
  const latency = metrics.latency();
  return [
    card("Nodes", `${count("alive")} alive`, [
      count("suspect") ? pill(`${count("suspect")} suspect`, "suspect") : null,
      count("dead") ? pill(`${count("dead")} dead`, "dead") : null,
    ]),
    card("In flight", `${inFlight} / ${capacity}`, "running / concurrency of live nodes"),
    card("Throughput", `${rate(metrics.throughput())} /s`, "tasks completed, last 10 s"),
    card("Latency p50 / p95", `${seconds(latency.p50)} / ${seconds(latency.p95)}`,
      `${latency.count} finished tasks, last 5 min`),
    card("Waiting", String(waiting), `in queues; ${cluster.delayed} delayed`),
    card("Dead letters", String(dead), dead ? pill("needs attention", "dead") : "none", dead ? "alert" : ""),
  ];
}

function card(title, value, note, kind = "") {
  return h("div", { class: `card ${kind}` }, h("div", { class: "card-title" }, title),
    h("div", { class: "card-value" }, value), h("div", { class: "card-note" }, note));
}

export function nodes(cluster, metrics, colors) {
  if (!cluster.nodes.length) return emptyRow(12, "No nodes: start one with `shoal node --app …`.");
  const order = { alive: 0, suspect: 1, dead: 2 };
  const sorted = [...cluster.nodes].sort((a, b) => order[a.state] - order[b.state] || a.id.localeCompare(b.id));
  return sorted.map((n) => row([
    [[colors.swatch(n.id), h("span", { class: "mono" }, n.id)], { class: "nowrap" }],
    [[pill(n.state), n.stalled ? pill(`stalled: ${n.stalled}`, "suspect") : null], {}],
    [`${n.host}:${n.pid}`, { class: "mono muted" }],
    [n.zone || "–", {}],
    [load(n), {}],
    [rate(metrics.throughput(10, n.id)), { class: "num" }],
    [String(n.completed), { class: "num" }],
    [`${n.cpu_percent.toFixed(0)}%`, { class: "num" }],
    [bytes(n.rss_bytes), { class: "num" }],
    [String(n.partitions), { class: "num" }],
    [String(n.active_agents), { class: "num" }],
    [seconds(n.heartbeat_age_s), { class: `num ${n.state === "alive" ? "" : "warn"}` }],
    [capabilities(n.capabilities, n.id), {}],
  ], { dataset: { nodeId: n.id, state: n.state }, class: `state-${n.state}` }));
}

function load(n) {
  const fraction = n.concurrency ? Math.min(1, n.in_flight / n.concurrency) : 0;
  const bar = h("span", { class: "bar" }, h("span", { class: "bar-fill" }));
  bar.firstChild.style.width = `${(fraction * 100).toFixed(1)}%`;
  return h("span", { class: "load" }, bar, `${n.in_flight} / ${n.concurrency}`);
}

function capabilities(names, key) {
  if (names.length <= 3) return h("span", { class: "mono small" }, names.join(", ") || "–");
  return h("details", { class: "caps", dataset: { key } }, h("summary", {}, `${names.length} capabilities`),
    h("span", { class: "mono small" }, names.join(", ")));
}

export function queues(cluster, metrics, showIdle) {
  const busy = (q) => q.depth || q.dead_letters || q.oldest_age_s !== null;
  const shown = cluster.queues.filter((q) => showIdle || busy(q))
    .sort((a, b) => b.depth - a.depth || b.dead_letters - a.dead_letters || queueKey(a).localeCompare(queueKey(b)));
  const hidden = cluster.queues.length - shown.length;
  const rows = shown.map((q) => {
    const trend = metrics.queueTrend(q);
    return row([
      [q.capability, { class: "mono" }],
      [pill(q.priority, `prio-${q.priority}`), {}],
      [String(q.depth), { class: "num" }],
      [String(q.waiting), { class: "num" }],
      [String(q.pending), { class: "num" }],
      [seconds(q.oldest_age_s), { class: "num" }],
      [trend === null ? "–" : `${trend > 0 ? "+" : ""}${rate(trend)}`, { class: `num ${trend > 0 ? "warn" : ""}` }],
      [String(q.consumers), { class: "num" }],
      [String(q.dead_letters), { class: `num ${q.dead_letters ? "bad" : ""}` }],
      [String(q.duplicates), { class: "num" }],
    ], { dataset: { queue: queueKey(q) } });
  });
  if (!rows.length) rows.push(emptyRow(10, "Every queue is empty."));
  return { rows, hidden };
}

const TERMINAL = new Set(["succeeded", "failed", "cancelled", "dead", "expired"]);

/** Latency once finished; else how long it has run, or waited since it was created. */
export function took(task) {
  if (task.finished_at) return ms(task.finished_at - task.created_at);
  if (TERMINAL.has(task.status)) return "–";
  if (task.status === "running" && task.started_at) return `running ${ms(Date.now() - task.started_at)}`;
  return `waiting ${ms(Date.now() - task.created_at)}`;
}

export function taskLink(id, open) {
  return h("button", { type: "button", class: "link mono", title: id, onclick: () => open(id) }, shortId(id));
}

export function tasks(list, open, emptyText) {
  if (!list.length) return emptyRow(7, emptyText);
  return list.map((t) => row([
    [taskLink(t.id, open), {}],
    [t.capability, { class: "mono" }],
    [pill(t.status), {}],
    [`${t.attempts} / ${t.max_attempts}`, { class: "num" }],
    [t.node || "–", { class: "mono small nowrap" }],
    [clock(t.created_at), { class: "nowrap" }],
    [took(t), { class: "num nowrap" }],
  ], { dataset: { taskId: t.id, status: t.status }, class: "clickable", onclick: clickRow(open, t.id) }));
}

/** partial: the listing stopped before the oldest task (it scans a bounded window). */
export function failures(list, open, partial) {
  const note = partial ? emptyRow(5, "Older failures may exist: the listing scans only the newest tasks.") : null;
  if (!list.length) return note || emptyRow(5, "No failed or dead tasks.");
  return [...list.map((t) => row([
    [taskLink(t.id, open), {}],
    [t.capability, { class: "mono" }],
    [pill(t.status), { title: `${t.attempts} of ${t.max_attempts} attempts` }],
    [clock(t.finished_at), { class: "nowrap" }],
    [t.error ? `${t.error.type}: ${t.error.message}` : "–", { class: "error-text" }],
  ], { dataset: { taskId: t.id, status: t.status }, class: "clickable", onclick: clickRow(open, t.id) })), note];
}

function clickRow(open, id) {
  return (event) => {
    if (!event.target.closest("button, a, summary")) open(id);
  };
}

/** letters: [[capability, {entries, count, message}]]; redrive(capability, ids|null). */
export function deadLetters(letters, open, redrive) {
  if (!letters.length) return h("p", { class: "muted" }, "No dead letters.");
  return letters.map(([capability, group]) => h("div", { class: "dlq", dataset: { capability } },
    h("div", { class: "dlq-head" },
      h("h3", {}, h("span", { class: "mono" }, capability), ` — ${group.count} dead`),
      h("button", { type: "button", class: "danger", onclick: () => redrive(capability, null) },
        `Redrive all ${group.count}`)),
    group.message ? h("p", { class: `notice ${group.message.kind}`, role: "status" }, group.message.text) : null,
    h("table", {}, h("thead", {}, h("tr", {}, ["Task", "Died", "Attempts", "Last error", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, group.entries.map(({ task }) => row([
        [taskLink(task.id, open), {}],
        [clock(task.finished_at), { class: "nowrap" }],
        [`${task.attempts} / ${task.max_attempts}`, { class: "num" }],
        [task.error ? `${task.error.type}: ${task.error.message}` : "–", { class: "error-text" }],
        [h("button", { type: "button", onclick: () => redrive(capability, [task.id]) }, "Redrive"), {}],
      ], { dataset: { taskId: task.id } }))))));
}

export function agentTypes(statuses, infos, colors) {
  if (!statuses.length) return emptyRow(6, "No agent types registered.");
  const topics = new Map(infos.map((t) => [t.name, t.topics]));
  return statuses.map((t) => row([
    [t.name, { class: "mono" }],
    [capabilities(t.capabilities, t.name), {}],
    [(topics.get(t.name) || []).join(", ") || "–", { class: "mono small" }],
    [t.handles_messages ? "yes" : "no", {}],
    [ownership(t, colors), {}],
    [String(t.backlog), { class: `num ${t.backlog ? "warn" : ""}` }],
  ], { dataset: { agentType: t.name } }));
}

function ownership(t, colors) {
  const bar = h("span", { class: "ownership", title: `${t.partitions} partitions` });
  const legend = [];
  for (const [node, count] of Object.entries(t.owners)) {
    const part = h("span", { class: `segment ${colors.klass(node)}` });
    part.style.width = `${(100 * count) / Math.max(1, t.partitions)}%`;
    bar.append(part);
    legend.push(h("span", { class: "owner" }, colors.swatch(node), h("span", { class: "mono" }, node), ` ${count}`));
  }
  if (t.unowned) legend.push(h("span", { class: "owner bad" }, `${t.unowned} unowned`));
  return h("div", {}, bar, h("div", { class: "legend small" }, legend));
}

export function agents(list, limit) {
  if (!list.length) return [emptyRow(7, "No agents active or with saved state.")];
  const rows = list.map((a) => row([
    [a.id, { class: "mono" }],
    [String(a.partition), { class: "num" }],
    [a.node || "–", { class: "mono small" }],
    [a.node ? pill("active", "alive") : pill("stored", "idle"), {}],
    [clock(a.activated_at), { class: "nowrap" }],
    [clock(a.last_message_at), { class: "nowrap" }],
    [a.state_size ? bytes(a.state_size) : "–", { class: "num" }],
  ], { dataset: { agentId: a.id } }));
  if (list.length >= limit) rows.push(emptyRow(7, `Showing the first ${limit} agents.`));
  return rows;
}

export function ownershipLog(changes, colors) {
  if (!changes.length) return [];
  return changes.map((c) => h("li", {}, h("span", { class: "muted" }, clock(c.at, true)), " ", colors.swatch(c.node),
    h("span", { class: "mono" }, c.node), ` ${c.event} `, h("span", { class: "mono" }, `${c.type}#${c.partition}`),
    h("span", { class: "muted" }, ` (token ${c.token})`)));
}
