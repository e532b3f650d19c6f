// Building DOM safely: every piece of data goes in as text (textContent, attribute
// values), never as HTML. Plus the formatters the views share.

/** An element: h("td", {class: "num", title: id}, "text", childNode, ...). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

const shown = new WeakMap(); // element -> the JSON of what it shows

/** Replace an element's children with render(data), unless data has not changed
 * (a text selection stays put between polls). <details data-key> stay open. */
export function show(el, data, render) {
  const signature = JSON.stringify(data);
  if (shown.get(el) === signature) return;
  shown.set(el, signature);
  const open = new Set([...el.querySelectorAll("details[open][data-key]")].map((d) => d.dataset.key));
  el.replaceChildren(...[render(data)].flat(Infinity).filter(Boolean));
  for (const details of el.querySelectorAll("details[data-key]")) {
    if (open.has(details.dataset.key)) details.open = true;
  }
}

export function pill(text, kind = text) {
  return h("span", { class: `pill pill-${kind}` }, text);
}

/** A table row of cells; a cell is a value or [value, attrs]. */
export function row(cells, attrs = {}) {
  return h("tr", attrs, cells.map((cell) => Array.isArray(cell) ? h("td", cell[1], cell[0]) : h("td", {}, cell)));
}

export function emptyRow(columns, text) {
  return h("tr", { class: "empty" }, h("td", { colspan: columns }, text));
}

export function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} m`;
  return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
}

export function ms(value) {
  return value === null || value === undefined ? "–" : seconds(value / 1000);
}

export function ago(epochMs) {
  return epochMs ? `${seconds(Math.max(0, (Date.now() - epochMs) / 1000))} ago` : "–";
}

/** Local time of day (with the date if not today; with milliseconds if precise). */
export function clock(epochMs, precise = false) {
  if (!epochMs) return "–";
  const d = new Date(epochMs);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  const day = d.toDateString() === new Date().toDateString() ? "" : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `;
  return day + time + (precise ? `.${pad(d.getMilliseconds(), 3)}` : "");
}

export function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log2(n) / 10));
  return `${(n / 2 ** (10 * i)).toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function rate(perSecond) {
  if (perSecond === null || perSecond === undefined || Number.isNaN(perSecond)) return "–";
  return perSecond >= 100 ? perSecond.toFixed(0) : perSecond >= 10 ? perSecond.toFixed(1) : perSecond.toFixed(2);
}

export function shortId(id) {
  return id ? `${id.slice(0, 6)}…${id.slice(-6)}` : "–";
}

export function percentile(sorted, p) {
  if (!sorted.length) return null;
  const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[index];
}

export function json(value) {
  return JSON.stringify(value, null, 2);
}
