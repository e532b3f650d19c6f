// Time-series charts drawn by hand on a <canvas>: lines or dots over the last
// `window` seconds, horizontal reference lines, a y axis with round steps.

const PAD = { left: 52, right: 12, top: 10, bottom: 22 };

/**
 * chart: {window: seconds, now: epoch ms, series: [{points: [[t, y]], kind: "line" |
 * "dots", color: CSS variable name}], marks: [{y, label, color, align: "left" | "right"}],
 * format: y -> text,
 * minTop: the y axis reaches at least this, empty: text when there are no points}
 */
export function draw(canvas, chart) {
  const ctx = fit(canvas);
  const { width, height } = canvas.getBoundingClientRect();
  const style = getComputedStyle(canvas);
  const color = (name) => style.getPropertyValue(name).trim() || "#888";
  ctx.clearRect(0, 0, width, height);
  ctx.font = `11px ${style.fontFamily}`;

  const from = chart.now - chart.window * 1000;
  const values = chart.series.flatMap((s) => s.points.filter(([t]) => t >= from).map(([, y]) => y ?? 0));
  const highest = Math.max(chart.minTop ?? 0, ...values, ...chart.marks.map((m) => m.y ?? 0));
  const top = 4 * niceCeiling(highest / 4); // four round steps of the y axis
  const plot = { x: PAD.left, y: PAD.top, w: width - PAD.left - PAD.right, h: height - PAD.top - PAD.bottom };
  const x = (t) => plot.x + ((t - from) / (chart.window * 1000)) * plot.w;
  const y = (v) => plot.y + plot.h - (v / top) * plot.h;

  axes(ctx, plot, top, chart, color, y);
  ctx.save();
  ctx.beginPath();
  ctx.rect(plot.x, plot.y - 1, plot.w + 1, plot.h + 2);
  ctx.clip();
  for (const series of chart.series) {
    const points = series.points.filter(([t, v]) => t >= from - 5000 && v !== null);
    (series.kind === "dots" ? dots : line)(ctx, points, x, y, color(series.color), plot);
  }
  for (const mark of chart.marks) if (mark.y !== null) reference(ctx, mark, plot, y, color(mark.color), chart.format);
  ctx.restore();
  if (!values.length) {
    ctx.fillStyle = color("--muted");
    ctx.textAlign = "center";
    ctx.fillText(chart.empty, plot.x + plot.w / 2, plot.y + plot.h / 2);
  }
}

function fit(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const { width, height } = canvas.getBoundingClientRect();
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return ctx;
}

function axes(ctx, plot, top, chart, color, y) {
  ctx.strokeStyle = color("--grid");
  ctx.fillStyle = color("--muted");
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    const py = Math.round(y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(plot.x, py);
    ctx.lineTo(plot.x + plot.w, py);
    ctx.stroke();
    ctx.fillText(chart.format(v), plot.x - 6, py);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const step = chart.window / 5;
  for (let i = 0; i <= 5; i++) {
    const px = plot.x + (i / 5) * plot.w;
    const ago = chart.window - i * step;
    const label = ago === 0 ? "now" : `-${ago >= 60 ? `${ago / 60}m` : `${ago}s`}`;
    ctx.textAlign = i === 0 ? "left" : i === 5 ? "right" : "center";
    ctx.fillText(label, px, plot.y + plot.h + 6);
  }
}

function line(ctx, points, x, y, stroke, plot) {
  if (!points.length) return;
  ctx.beginPath();
  points.forEach(([t, v], i) => (i ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
  ctx.strokeStyle = stroke;
  ctx.lineWidth = 1.8;
  ctx.lineJoin = "round";
  ctx.stroke();
  ctx.lineTo(x(points.at(-1)[0]), plot.y + plot.h);
  ctx.lineTo(x(points[0][0]), plot.y + plot.h);
  ctx.closePath();
  ctx.globalAlpha = 0.15;
  ctx.fillStyle = stroke;
  ctx.fill();
  ctx.globalAlpha = 1;
}

function dots(ctx, points, x, y, fill) {
  ctx.fillStyle = fill;
  ctx.globalAlpha = 0.7;
  for (const [t, v] of points) {
    ctx.beginPath();
    ctx.arc(x(t), y(v), 2.5, 0, 2 * Math.PI);
    ctx.fill();
  }
  ctx.globalAlpha = 1;
}

function reference(ctx, mark, plot, y, stroke, format) {
  const py = Math.round(y(mark.y)) + 0.5;
  ctx.strokeStyle = stroke;
  ctx.setLineDash([5, 4]);
  ctx.lineWidth = 1.2;
  ctx.beginPath();
  ctx.moveTo(plot.x, py);
  ctx.lineTo(plot.x + plot.w, py);
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = stroke;
  ctx.textAlign = mark.align || "right";
  ctx.textBaseline = "bottom";
  const x = ctx.textAlign === "left" ? plot.x + 4 : plot.x + plot.w - 4;
  ctx.fillText(`${mark.label} ${format(mark.y)}`, x, py - 2);
}

/** 1, 2, 2.5 or 5 times a power of ten, at least `value` (and > 0). */
function niceCeiling(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}
