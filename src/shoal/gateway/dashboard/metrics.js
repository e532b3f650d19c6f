// Rates and latencies the API does not compute: derived here from successive polls.
//
// Throughput: each node's `completed` counter (in /v1/cluster, updated with its
// heartbeat) is sampled at every poll; the rate between two samples is the sum, over
// the nodes present in both, of the counter's increase, divided by the time between
// them. A node that died keeps its last count (no false drop); a new node counts
// from its second sample.
// Queue trend: the change of a queue's depth per second between samples (> 0: the
// backlog grows).
// Latency: finished_at - created_at of the finished tasks seen in /v1/tasks
// (queue wait plus run time), over the chart's window.

import { percentile } from "./dom.js";

export const WINDOW_S = 300; // what the charts show
const SMOOTHING_S = 5; // each chart point is the rate over this many seconds
const HEADLINE_S = 10; // the rates in the tables and cards
const MAX_SAMPLES = 1200;
const MAX_LATENCIES = 5000;
const FINISHED = new Set(["succeeded", "failed", "dead"]);

export class Metrics {
  constructor() {
    this.samples = []; // {t, completed: {node: count}, depth: {"cap/prio": depth}}
    this.latencies = new Map(); // task id -> {at: finished_at, s: seconds}
  }

  addCluster(cluster, t = Date.now()) {
    const completed = Object.fromEntries(cluster.nodes.map((n) => [n.id, n.completed]));
    const depth = Object.fromEntries(cluster.queues.map((q) => [queueKey(q), q.depth]));
    this.samples.push({ t, completed, depth });
    const oldest = t - (WINDOW_S + SMOOTHING_S + 5) * 1000;
    while (this.samples.length > MAX_SAMPLES || this.samples[0].t < oldest) this.samples.shift();
  }

  /** The earliest sample within `seconds` before sample `i` (null: none before it). */
  baseline(i, seconds) {
    const since = this.samples[i].t - seconds * 1000;
    for (let j = 0; j < i; j++) if (this.samples[j].t >= since) return this.samples[j];
    return null;
  }

  /** Completed tasks per second over the last `seconds`: all nodes, or one. */
  throughput(seconds = HEADLINE_S, node = null) {
    const last = this.samples.length - 1;
    if (last < 1) return null;
    return completedRate(this.baseline(last, seconds) ?? this.samples[last - 1], this.samples[last], node);
  }

  /** [[t, tasks/s]] over the chart window, each smoothed over SMOOTHING_S. */
  throughputSeries() {
    const out = [];
    for (let i = 1; i < this.samples.length; i++) {
      const base = this.baseline(i, SMOOTHING_S) ?? this.samples[i - 1];
      out.push([this.samples[i].t, completedRate(base, this.samples[i], null)]);
    }
    return out;
  }

  /** Depth change per second of one queue over the last `seconds` (null: unknown yet). */
  queueTrend(queue, seconds = HEADLINE_S) {
    const last = this.samples.length - 1;
    if (last < 1) return null;
    const base = this.baseline(last, seconds) ?? this.samples[last - 1];
    const key = queueKey(queue);
    const before = base.depth[key];
    const dt = (this.samples[last].t - base.t) / 1000;
    return before === undefined || dt <= 0 ? null : (queue.depth - before) / dt;
  }

  addTasks(tasks) {
    for (const task of tasks) {
      if (!task.finished_at || !FINISHED.has(task.status)) continue;
      this.latencies.set(task.id, { at: task.finished_at, s: (task.finished_at - task.created_at) / 1000 });
    }
    const oldest = Date.now() - WINDOW_S * 1000;
    for (const [id, point] of this.latencies) {
      if (point.at < oldest || this.latencies.size > MAX_LATENCIES) this.latencies.delete(id);
    }
  }

  /** Points [[finished_at, seconds]] in the window, and their p50 and p95. */
  latency() {
    const oldest = Date.now() - WINDOW_S * 1000;
    const points = [...this.latencies.values()].filter((p) => p.at >= oldest).map((p) => [p.at, p.s]);
    const sorted = points.map((p) => p[1]).sort((a, b) => a - b);
    return { points, count: sorted.length, p50: percentile(sorted, 50), p95: percentile(sorted, 95) };
  }
}

export function queueKey(queue) {
  return `${queue.capability}/${queue.priority}`;
}

function completedRate(a, b, node) {
  const dt = (b.t - a.t) / 1000;
  if (dt <= 0) return null;
  let done = 0;
  for (const [id, count] of Object.entries(b.completed)) {
    if ((node === null || id === node) && a.completed[id] !== undefined) {
      done += Math.max(0, count - a.completed[id]);
    }
  }
  return done / dt;
}
