// The task drill-down: its record (attempts, timing, errors with tracebacks, result),
// refreshed while the panel is open, and its events, followed live.

import { ApiError, get } from "./api.js";
import { clock, h, json, ms, pill, show } from "./dom.js";
import { follow } from "./events.js";
import { sagaKind } from "./sagas.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled", "dead", "expired"]);
const MAX_EVENTS = 1000;

export class TaskDetail {
  constructor(root) {
    this.root = root;
    this.taskId = null;
    this.follower = null;
    this.sagaOf = new Map(); // task id -> {saga, step, role}: set by the sagas panel
    root.querySelector(".close").addEventListener("click", () => this.close());
    document.addEventListener("keydown", (e) => e.key === "Escape" && this.close());
    this.record = root.querySelector("#detail-record");
    this.eventList = root.querySelector("#detail-events");
    this.streamState = root.querySelector("#detail-stream");
  }

  get isOpen() {
    return this.taskId !== null;
  }

  open(taskId) {
    this.close();
    this.taskId = taskId;
    this.root.hidden = false;
    this.root.querySelector("#detail-id").textContent = taskId;
    this.record.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    this.eventList.replaceChildren();
    this.seen = new Set();
    this.refresh().catch(() => {}); // shown in the panel
    this.follower = follow(taskId, {
      onEvent: (event) => this.addEvent(event),
      onStatus: (text) => this.setStream(text),
      isFinal: async () => TERMINAL.has((await this.refresh()).task.status),
    });
    this.setStream(`connecting (${this.follower.mode})`);
  }

  close() {
    if (this.follower) this.follower.close();
    this.follower = null;
    this.taskId = null;
    this.root.hidden = true;
  }

  /** Fetch and show the record; returns it (throws if it cannot be read). */
  async refresh() {
    const taskId = this.taskId;
    try {
      const result = await get(`v1/tasks/${encodeURIComponent(taskId)}`);
      if (taskId === this.taskId) show(this.record, { result, part: this.sagaOf.get(taskId) },
        ({ part }) => [record(result, (id) => this.open(id)), sagaPart(part)]);
      return result;
    } catch (error) {
      if (taskId === this.taskId) {
        show(this.record, { error: error.message }, () => h("p", { class: "notice bad", role: "alert" },
          error instanceof ApiError ? error.text : String(error)));
      }
      throw error;
    }
  }

  setStream(text) {
    this.streamState.textContent = `${text} · ${this.follower ? this.follower.mode : ""}`;
    this.streamState.dataset.state = text.split(/[ :]/)[0];
    if (text === "ended" && !this.eventList.children.length) {
      this.eventList.append(h("li", { class: "muted" }, "No events: the task recorded none."));
    }
  }

  addEvent(event) {
    if (this.seen.has(event.id)) return; // a reconnect never repeats one, but be sure
    this.seen.add(event.id);
    this.eventList.append(eventItem(event));
    while (this.eventList.children.length > MAX_EVENTS) this.eventList.firstChild.remove();
  }
}

function record({ task, result }, open) {
  const field = (name, value) => [h("dt", {}, name), h("dd", {}, value ?? "–")];
  const wait = task.started_at ? task.started_at - task.created_at : null;
  const run = task.started_at && task.finished_at ? task.finished_at - task.started_at : null;
  const total = task.finished_at ? task.finished_at - task.created_at : null;
  return [
    h("div", { class: "detail-head" }, h("span", { class: "mono big" }, task.capability), pill(task.status),
      h("span", { class: "muted" }, `priority ${task.priority}`)),
    h("dl", { class: "fields" },
      field("attempts", `${task.attempts} of ${task.max_attempts}`),
      field("node", task.node && h("span", { class: "mono" }, task.node)),
      field("created", clock(task.created_at, true)),
      field("started", clock(task.started_at, true)),
      field("finished", clock(task.finished_at, true)),
      field("queue wait", ms(wait)),
      field("run time", ms(run)),
      field("latency", ms(total)),
      task.scheduled_for ? field("scheduled for", clock(task.scheduled_for, true)) : null,
      task.parent ? field("parent", h("button", { type: "button", class: "link mono", onclick: () => open(task.parent) }, task.parent)) : null,
      task.cancel_requested ? field("cancel", "requested") : null,
      task.duplicates ? field("duplicates", String(task.duplicates)) : null,
      task.traceparent ? field("trace", h("span", { class: "mono small" }, task.traceparent)) : null),
    task.has_result ? [h("h3", {}, "Result"), h("pre", { class: "json" }, json(result))] : null,
    errors(task),
  ];
}

function errors(task) {
  const list = task.errors.length ? task.errors : task.error ? [task.error] : [];
  if (!list.length) return null;
  return [
    h("h3", {}, `Errors (${list.length})`),
    h("ol", { class: "errors" }, list.map((e, i) => h("li", {},
      h("div", {}, h("strong", {}, e.type), ": ", e.message),
      h("div", { class: "muted small" }, `attempt ${e.attempt}${e.node ? ` on ${e.node}` : ""} at ${clock(e.at, true)}`),
      e.traceback ? h("details", { dataset: { key: `tb${i}-${e.at}` } }, h("summary", {}, "traceback"),
        h("pre", { class: "traceback" }, e.traceback)) : null))),
  ];
}

function eventItem(event) {
  return h("li", { dataset: { kind: event.kind, eventId: event.id } },
    h("span", { class: "muted mono small" }, clock(event.at, true)), pill(event.kind, `event-${event.kind}`),
    eventBody(event));
}

function eventBody({ kind, data }) {
  if (kind === "progress" && data && typeof data.fraction === "number") {
    const bar = h("span", { class: "bar" }, h("span", { class: "bar-fill" }));
    bar.firstChild.style.width = `${(data.fraction * 100).toFixed(1)}%`;
    return h("span", { class: "event-body" }, bar, `${Math.round(data.fraction * 100)}%`,
      data.message ? ` ${data.message}` : "");
  }
  if (kind === "log" && data) return h("span", { class: "event-body" }, `[${data.level}] ${data.message}`);
  if (kind === "done" && data) return h("span", { class: "event-body" }, "ended ", pill(data.status));
  if (kind === "redriven") return h("span", { class: "event-body" }, "queued again from the dead letters");
  return h("code", { class: "event-body small" }, JSON.stringify(data));
}

/** Where a task belongs in a saga: the saga, its status, and the step it runs. */
function sagaPart(part) {
  if (!part) return null;
  const { saga, step, role } = part;
  return h("div", { class: "saga-part", dataset: { sagaId: saga.id } },
    h("h3", {}, "Saga"),
    h("p", {}, h("span", { class: "mono" }, saga.name), " ", h("span", { class: "mono small" }, saga.id), " ",
      pill(saga.status, sagaKind(saga.status)),
      " — ", `${role === "step" ? "step" : "compensation of step"} ${step.name} (${step.status})`),
    saga.error ? h("p", { class: "error-text" }, saga.error) : null);
}
