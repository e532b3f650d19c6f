// Sagas: each recent saga with its steps. A step is a task: its pill opens the task's
// drill-down, and the drill-down of a task that belongs to a saga names the saga and
// the step (sagaOf).

import { ago, emptyRow, h, pill, row } from "./dom.js";

/** task id -> {saga, step, role}, for the drill-down of a task that is part of a saga. */
export function sagaTasks(sagas) {
  const index = new Map();
  for (const saga of sagas) {
    for (const step of saga.steps) {
      if (step.task) index.set(step.task, { saga, step, role: "step" });
      if (step.compensation_task) index.set(step.compensation_task, { saga, step, role: "compensation" });
    }
  }
  return index;
}

export function sagaRows(sagas, open) {
  if (!sagas.length) return emptyRow(5, "No sagas.");
  return sagas.map((saga) => row([
    [h("span", { class: "mono small" }, saga.id), {}],
    [saga.name, { class: "mono" }],
    [pill(saga.status, sagaKind(saga.status)), { title: saga.error || "" }],
    [h("span", { class: "saga-steps" }, saga.steps.map((step) => stepPill(step, open))), {}],
    [ago(saga.updated_at), { class: "nowrap" }],
  ], { dataset: { sagaId: saga.id, status: saga.status } }));
}

function stepPill(step, open) {
  const task = step.compensation_task || step.task;
  const label = `${step.name}: ${step.status}`;
  const problem = (p) => (p ? `${p.type}: ${p.message}` : null);
  const title = [step.capability, step.compensate ? `undo: ${step.compensate}` : null,
    problem(step.error), step.compensation_error ? `undo failed: ${problem(step.compensation_error)}` : null,
  ].filter(Boolean).join(" · ");
  if (!task) return pill(label, sagaKind(step.status));
  return h("button", { type: "button", class: `link pill pill-${sagaKind(step.status)}`, title,
    dataset: { step: step.name, taskId: task }, onclick: () => open(task) }, label);
}

/** A saga's (or step's) status as one of the pill colours the page has. */
export function sagaKind(status) {
  if (status === "succeeded") return "succeeded";
  if (status === "compensated" || status === "unknown") return "queued"; // a warning colour
  if (status === "compensation_failed" || status === "failed") return "failed";
  if (status === "cancelled") return "expired";
  return "running";
}
