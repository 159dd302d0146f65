// mpq dashboard: progressive enhancement of server-rendered pages. No build step, no network
// beyond this origin. Every chart's figures are also in a table that works without this file.
"use strict";

document.documentElement.classList.add("js");

const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };
const PLOT_LAYOUT = { margin: { t: 20, r: 20, b: 40, l: 70 }, font: { family: "system-ui, sans-serif", size: 12 },
                      hovermode: "closest", xaxis: { automargin: true }, yaxis: { automargin: true } };
const FINISHED = ["succeeded", "failed", "cancelled"]; // service/job_status.py FINISHED (pinned by a test)
const POLL_MS = 1000;

function readJSON(id) {
  const element = document.getElementById(id);
  return element ? JSON.parse(element.textContent) : null;
}

function canPlot(id) {
  return window.Plotly && document.getElementById(id);
}

function csrfHeaders() {
  // The double-submit token of this page (service/dashboard/pages.py require_csrf): state-changing requests send it.
  return { "X-CSRF-Token": document.querySelector('meta[name="csrf-token"]').content };
}

async function problemText(response) {
  // Errors are application/problem+json with a "detail" naming what is wrong.
  try {
    const body = await response.json();
    return body.detail || body.title || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// ------------------------------------------------------------------ models: upload

function initUpload() {
  const form = document.getElementById("upload-form");
  if (!form) return;
  const status = document.getElementById("upload-status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const kind = form.elements.kind.value;
    const file = form.elements.file.files[0];
    if (!file) return;
    const name = form.elements.name.value.trim() || file.name;
    status.textContent = `Uploading ${file.name} (${file.size.toLocaleString()} bytes)…`;
    const response = await fetch(`/upload/${kind}?name=${encodeURIComponent(name)}`, {
      method: "POST", body: file,
      headers: { "Content-Type": "application/octet-stream", Accept: "application/json", ...csrfHeaders() },
    });
    if (!response.ok) {
      status.textContent = `Upload failed: ${await problemText(response)}`;
      return;
    }
    const row = await response.json();
    status.textContent = `Uploaded ${row.name}.`;
    window.location.assign(kind === "models" ? `/models/${row.id}` : "/models#datasets-heading");
  });
}

// ------------------------------------------------------------------ sensitivity charts

function initSensitivity() {
  const data = readJSON("sensitivity-data");
  if (!data) return;
  if (canPlot("trace-chart")) {
    Plotly.newPlot("trace-chart", [{
      type: "bar", x: data.layers, y: data.average_trace, name: "average trace",
      error_y: { type: "data", array: data.average_trace_se, visible: true }, customdata: data.nodes,
      hovertemplate: "%{x}<br>node %{customdata}<br>Tr(H)/n = %{y:.4g} ± %{error_y.array:.2g}<extra></extra>",
    }], { ...PLOT_LAYOUT, yaxis: { automargin: true, title: { text: "Tr(H\u1d62)/n\u1d62" }, exponentformat: "e" } },
    PLOT_CONFIG);
  }
  if (canPlot("eigen-chart")) {
    Plotly.newPlot("eigen-chart", [{
      type: "bar", x: data.layers, y: data.eigenvalue, name: "top eigenvalue", marker: { color: "#e69f00" },
      customdata: data.nodes, hovertemplate: "%{x}<br>node %{customdata}<br>λ = %{y:.4g}<extra></extra>",
    }], { ...PLOT_LAYOUT, yaxis: { automargin: true, title: { text: "top eigenvalue" }, exponentformat: "e" } },
    PLOT_CONFIG);
  }
  const heatmap = data.heatmap;
  if (heatmap && canPlot("g-chart")) {
    const limit = Math.max(...heatmap.z.flat().map(Math.abs)) || 1;
    Plotly.newPlot("g-chart", [{
      type: "heatmap", z: heatmap.z, x: heatmap.layers, y: heatmap.layers, colorscale: "RdBu", reversescale: true,
      zmin: -limit, zmax: limit, hovertemplate: "G[%{y}, %{x}] = %{z:.4g}<extra></extra>",
    }], { ...PLOT_LAYOUT, yaxis: { automargin: true, autorange: "reversed" } }, PLOT_CONFIG);
  }
  const bits = document.getElementById("bits");
  if (bits) bits.addEventListener("change", () => bits.form.requestSubmit());
}

// ------------------------------------------------------------------ plan: frontier chart and point detail

// Okabe-Ito, as dashboard.css's precision colours: a uniform baseline takes its candidate's colour.
const PRECISION_COLOURS = { fp32: "#7a7a7a", w8a8: "#009e73", w8: "#56b4e9", w4a8: "#e69f00", w4: "#d55e00", fp16: "#cc79a7", w8a16: "#0072b2" };
const BUDGET_FOR_AXIS = { size_bytes: "max_size_bytes", bops: "max_bops", latency_ms: "max_latency_ms" };
const BUDGET_WORDS = { size_bytes: "size budget", bops: "BOPS budget", latency_ms: "latency budget" };
// An axis is logarithmic when its largest value is more than this many times its smallest, chosen
// by the data shown: the dashboard fixture's sizes span 8x (fp32 to w4a8) and read well on a linear
// axis; its BOPS span 32x (activation bits count too), where a linear axis piles the cheap points
// against the left edge.
const LOG_SPREAD = 20;
const BUDGET_COLOUR = "#b42318";

function short(value) {
  // Four significant digits, as the tables' num filter shows them.
  return String(Number(value.toPrecision(4)));
}

function inUnit(data, key, value) {
  // The figure in the unit its table column uses (service/dashboard/units.py); others as stored.
  const unit = data.units[key];
  return value == null || !unit ? value : value / unit.per;
}

function isPowerOfTen(value) {
  const exponent = Math.log10(value);
  return Math.abs(exponent - Math.round(exponent)) < 1e-9;
}

function logTicks(low, high) {
  // 1, 2 and 5 per decade; past eight of them, the powers of ten alone.
  const ticks = [];
  for (let exponent = Math.floor(Math.log10(low)); exponent <= Math.ceil(Math.log10(high)); exponent++) {
    for (const mantissa of [1, 2, 5]) {
      const tick = Number((mantissa * 10 ** exponent).toPrecision(6));
      if (tick >= low && tick <= high) ticks.push(tick);
    }
  }
  return ticks.length > 8 ? ticks.filter(isPowerOfTen) : ticks;
}

function axisLayout(title, values) {
  // The range is set here rather than by plotly's autorange, so that it covers every value shown
  // (budget lines included) and the budget's label can go on the side of its line that has room.
  const base = { title: { text: title }, automargin: true, zeroline: false };
  const shown = values.filter((v) => v != null && Number.isFinite(v));
  if (!shown.length) return base;
  const low = Math.min(...shown);
  const high = Math.max(...shown);
  if (shown.length > 1 && low > 0 && high / low > LOG_SPREAD) {
    const pad = (Math.log10(high) - Math.log10(low)) * 0.06;
    const range = [Math.log10(low) - pad, Math.log10(high) + pad];
    const ticks = logTicks(10 ** range[0], 10 ** range[1]);
    return { ...base, type: "log", range, tickvals: ticks, ticktext: ticks.map(short) };
  }
  const span = high - low || Math.abs(high) * 0.1 || 1;
  return { ...base, type: "linear", range: [low - span * 0.06, high + span * 0.06] };
}

function frontierTraces(data, x, y, titles) {
  const has = (p) => p[x] != null && p[y] != null;
  const xs = (rows) => rows.map((p) => inUnit(data, x, p[x]));
  const ys = (rows) => rows.map((p) => p[y]);
  const figures = `${titles.x}: %{x:.4g}<br>${titles.y}: %{y:.4g}`;
  const hover = `${data.point_word} %{customdata}<br>${figures}<extra></extra>`;
  const points = data.points.filter(has).sort((a, b) => a[x] - b[x]);
  // The staircase joins a frontier in (cost, prediction); measured metrics and bisection steps are points only.
  const staircase = y !== "metric" && data.search === "pareto";
  const traces = [{
    type: "scatter", mode: staircase ? "lines+markers" : "markers", name: data.trace_name, x: xs(points),
    y: ys(points), customdata: points.map((p) => p.index), hovertemplate: hover,
    marker: { size: 11, color: "#0b5cad" }, line: { shape: "hv", color: "#0b5cad", width: 1 },
  }];
  // One legend entry per baseline instead of text beside its marker: labels beside markers overlap
  // each other and the frontier wherever the points crowd (fp32 and w8a8 predict nearly the same).
  for (const baseline of data.baselines.filter(has)) {
    traces.push({
      type: "scatter", mode: "markers", name: `uniform ${baseline.candidate}`, x: xs([baseline]), y: ys([baseline]),
      customdata: [baseline.index], hovertemplate: `uniform ${baseline.candidate}<br>${figures}<extra></extra>`,
      marker: { symbol: "diamond", size: 13, color: PRECISION_COLOURS[baseline.candidate] || "#1b1f24",
                line: { color: "#1b1f24", width: 1 } },
    });
  }
  const chosen = points.filter((p) => p.chosen);
  if (chosen.length) {
    traces.push({
      type: "scatter", mode: "markers", name: "chosen", x: xs(chosen), y: ys(chosen),
      customdata: chosen.map((p) => p.index), hovertemplate: hover,
      marker: { symbol: "star", size: 18, color: "#f0e442", line: { color: "#1b1f24", width: 1 } },
    });
  }
  const selected = points.filter((p) => p.index === data.selected);
  traces.push({
    type: "scatter", mode: "markers", name: "selected", x: xs(selected), y: ys(selected),
    customdata: selected.map((p) => p.index), hovertemplate: hover, showlegend: selected.length > 0,
    marker: { size: 22, color: "rgba(0,0,0,0)", line: { color: "#000", width: 2.5 } },
  });
  return traces;
}

function budgetLine(data, x, xaxis) {
  // The x axis's budget: a vertical line, labelled in words above the plot (where no point can be)
  // on the side of the line with room.
  const budget = inUnit(data, x, data.constraints[BUDGET_FOR_AXIS[x]]);
  if (budget == null) return { shapes: [], annotations: [] };
  const position = xaxis.type === "log" ? Math.log10(budget) : budget;  // annotations take log10 on log axes
  const right = (position - xaxis.range[0]) / (xaxis.range[1] - xaxis.range[0]) > 0.5;
  return {
    shapes: [{ type: "line", xref: "x", yref: "paper", x0: budget, x1: budget, y0: 0, y1: 1,
               line: { color: BUDGET_COLOUR, dash: "dash", width: 2 } }],
    annotations: [{ xref: "x", yref: "paper", x: position, y: 1, yanchor: "bottom", showarrow: false,
                    xanchor: right ? "right" : "left", xshift: right ? -4 : 4, font: { color: BUDGET_COLOUR },
                    text: `${BUDGET_WORDS[x]} ${short(budget)} ${data.units[x].name}` }],
  };
}

function metricLines(data) {
  // The float model's metric and the drop limit below it, named in the legend: a label on the line
  // itself would cover the points that sit on or near it, as the chosen one often does.
  if (data.float_metric == null) return [];
  const line = (at, name, colour, dash) => ({ type: "line", xref: "paper", yref: "y", x0: 0, x1: 1, y0: at, y1: at,
                                               name, showlegend: true, line: { color: colour, dash, width: 2 } });
  const lines = [line(data.float_metric, `float model ${short(data.float_metric)} %`, "#7a7a7a", "dot")];
  const maxDrop = data.constraints.max_drop;
  if (maxDrop != null) {
    const floor = data.float_metric - maxDrop;
    lines.push(line(floor, `drop limit ${short(maxDrop)} pp: ${short(floor)} %`, BUDGET_COLOUR, "dash"));
  }
  return lines;
}

function drawFrontier(data) {
  const x = document.getElementById("frontier-x").value;
  const y = document.getElementById("frontier-y").value;
  const titles = { x: data.units[x].label, y: y === "metric" ? `measured ${data.metric_name} (%)` : data.predictor_label };
  const traces = frontierTraces(data, x, y, titles);
  const xaxis = axisLayout(titles.x, [...traces.flatMap((t) => t.x), inUnit(data, x, data.constraints[BUDGET_FOR_AXIS[x]])]);
  const metric = y === "metric" ? metricLines(data) : [];
  const yaxis = axisLayout(titles.y, [...traces.flatMap((t) => t.y), ...metric.map((line) => line.y0)]);
  const budget = budgetLine(data, x, xaxis);
  const layout = { ...PLOT_LAYOUT, margin: { t: 30, r: 20, b: 10, l: 80 }, xaxis, yaxis,
                   shapes: [...budget.shapes, ...metric], annotations: budget.annotations,
                   legend: { orientation: "h", x: 0, xanchor: "left", y: 0, yref: "container", yanchor: "bottom",
                             itemsizing: "constant" } };  // the 22 px ring and the star would overlap the next row
  Plotly.react("frontier-chart", traces, layout, PLOT_CONFIG);
}

async function showPoint(data, index) {
  const response = await fetch(`/plans/${data.plan_id}/points/${index}`);
  const detail = document.getElementById("point-detail");
  if (!response.ok) {
    detail.textContent = `Could not load point ${index}: ${response.status} ${response.statusText}`;
    return;
  }
  detail.innerHTML = await response.text();
  data.selected = index;
  history.replaceState(null, "", `?point=${index}`);
  for (const row of document.querySelectorAll("#frontier-table tbody tr")) {
    const isSelected = Number(row.dataset.pointIndex) === index;
    row.classList.toggle("selected", isSelected);
    if (isSelected) row.setAttribute("aria-current", "true"); else row.removeAttribute("aria-current");
  }
  if (canPlot("frontier-chart")) drawFrontier(data);
  document.getElementById("point-heading")?.focus();
}

function initFrontier() {
  const data = readJSON("frontier-data");
  if (!data) return;
  for (const link of document.querySelectorAll(".point-link")) {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      showPoint(data, Number(link.dataset.pointIndex));
    });
  }
  initLatencyFrontier(data);
  if (!canPlot("frontier-chart")) return;
  for (const id of ["frontier-x", "frontier-y"]) {
    document.getElementById(id).addEventListener("change", () => drawFrontier(data));
  }
  drawFrontier(data);
  document.getElementById("frontier-chart").on("plotly_click", (event) => {
    const index = event.points[0]?.customdata;
    if (index != null) showPoint(data, index);
  });
}

// ------------------------------------------------------------------ plan: accuracy against measured latency

// The reference models (planner.result.PlanResult.baselines) in their candidates' colours, and the
// points measured slower than float in the budget's red with a marker of their own, so that neither
// colour nor shape alone tells them apart.
const REFERENCE_MARKERS = { fp32: "square", fp16: "diamond" };

const LATENCY_Y = {  // the y axis's figure, and the other one, which the hover gives beside it
  metric: { other: "drop", hover: "%{y:.4g} %, drop %{customdata[1]} pp" },
  drop: { other: "metric", hover: "drop %{y:.4g} pp, %{customdata[1]} %" },
};

function latencyRows(rows, title, y) {
  // Hover: the ratio to float (from the interleaved run) and the figure not plotted beside p50 and y.
  const shown = rows.filter((r) => r[y] != null);
  const other = LATENCY_Y[y].other;
  return {
    x: shown.map((r) => r.p50_ms), y: shown.map((r) => r[y]),
    customdata: shown.map((r) => [r.ratio_text || "ratio to float not measured",
                                  r[other] == null ? "—" : short(r[other]), r.index ?? null]),
    hovertemplate: `${title}<br>p50 %{x:.4g} ms, %{customdata[0]}<br>${LATENCY_Y[y].hover}<extra></extra>`,
  };
}

function latencyFrontierTraces(data, y) {
  const lf = data.accuracy_latency;
  const point = `${data.point_word} %{customdata[2]}`;
  const marker = (symbol, size, color) => ({ symbol, size, color, line: { color: "#1b1f24", width: 1 } });
  const slower = lf.points.filter((p) => p.slower);
  const traces = [
    { type: "scatter", mode: "markers", name: `measured ${data.trace_name === "frontier" ? "frontier points" : data.trace_name}`,
      ...latencyRows(lf.points.filter((p) => !p.slower), point, y), marker: { size: 11, color: "#0b5cad" } },
    { type: "scatter", mode: "markers", name: "slower than float", showlegend: slower.length > 0,
      ...latencyRows(slower, `${point}: slower than float`, y), marker: marker("triangle-up", 14, BUDGET_COLOUR) },
  ];
  for (const reference of lf.references) {
    traces.push({ type: "scatter", mode: "markers", name: reference.label, ...latencyRows([reference], reference.label, y),
                  marker: marker(REFERENCE_MARKERS[reference.name] || "circle", 13, PRECISION_COLOURS[reference.name]) });
  }
  if (lf.chosen) {
    const chosen = { ...lf.chosen, index: lf.points.find((p) => p.chosen)?.index ?? null };
    traces.push({ type: "scatter", mode: "markers", name: "chosen", ...latencyRows([chosen], "chosen configuration", y),
                  marker: marker("star", 18, "#f0e442") });
  }
  return traces;
}

function drawLatencyFrontier(data) {
  const y = document.getElementById("latency-y").value;
  const traces = latencyFrontierTraces(data, y);
  const title = y === "metric" ? `measured ${data.metric_name} (%)` : "measured drop (pp)";
  const xaxis = axisLayout(data.units.latency_p50_ms.label, traces.flatMap((t) => t.x));
  const yaxis = axisLayout(title, traces.flatMap((t) => t.y));
  const layout = { ...PLOT_LAYOUT, margin: { t: 20, r: 20, b: 10, l: 80 }, xaxis, yaxis,
                   legend: { orientation: "h", x: 0, xanchor: "left", y: 0, yref: "container", yanchor: "bottom",
                             itemsizing: "constant" } };
  Plotly.react("latency-frontier-chart", traces, layout, PLOT_CONFIG);
}

function initLatencyFrontier(data) {
  // The frontier chart's data object: a point clicked on either chart is the selected one on both.
  if (!data.accuracy_latency || !canPlot("latency-frontier-chart")) return;
  drawLatencyFrontier(data);
  document.getElementById("latency-y").addEventListener("change", () => drawLatencyFrontier(data));
  document.getElementById("latency-frontier-chart").on("plotly_click", (event) => {
    const index = event.points[0]?.customdata?.[2];
    if (index != null) showPoint(data, index);
  });
}

// ------------------------------------------------------------------ latency chart

function initLatency() {
  // Bars are the median (p50); whiskers reach up to p90. Latency measurements store mean, p50 and
  // p90 only (planner/latency.py), so there is no lower whisker; the mean, which a slow outlier can
  // push past p90, is a marker of its own rather than the bar that whiskers hang from.
  const data = readJSON("latency-data");
  if (!data || !canPlot("latency-chart")) return;
  const bars = data.devices.map((d, i) => ({
    type: "bar", name: d.device, x: d.labels, y: d.p50_ms, offsetgroup: String(i),
    customdata: d.p90_ms.map((p90, k) => [p90, d.mean_ms[k]]),
    error_y: { type: "data", symmetric: false, visible: true, color: "#1b1f24",
               array: d.p90_ms.map((p90, k) => Math.max(0, p90 - d.p50_ms[k])), arrayminus: d.p50_ms.map(() => 0) },
    hovertemplate: "p50 (median) %{y:.3f} ms<br>p90 %{customdata[0]:.3f} ms<br>mean %{customdata[1]:.3f} ms"
                   + "<extra>%{fullData.name}</extra>",
  }));
  const means = data.devices.map((d, i) => ({
    type: "scatter", mode: "markers", name: "mean", x: d.labels, y: d.mean_ms, offsetgroup: String(i),
    legendgroup: "mean", showlegend: i === 0, hovertemplate: "mean %{y:.3f} ms<extra></extra>",
    marker: { symbol: "diamond-open", size: 10, color: "#1b1f24", line: { width: 2 } },
  }));
  const traces = [...bars, ...means];
  Plotly.newPlot("latency-chart", traces, {
    ...PLOT_LAYOUT, barmode: "group", scattermode: "group",
    yaxis: { automargin: true, rangemode: "tozero", title: { text: "latency (ms)" } },
    legend: { orientation: "h", x: 0, y: 0, yref: "container", yanchor: "bottom" }, margin: { t: 20, r: 20, b: 10, l: 70 },
  }, PLOT_CONFIG);
}

// ------------------------------------------------------------------ jobs: live progress and cancel

function formatTime(iso) {
  return iso ? `${iso.slice(0, 19).replace("T", " ")} UTC` : "—";
}

function setField(container, field, text) {
  const element = container.querySelector(`[data-field="${field}"]`);
  if (element) element.textContent = text;
  return element;
}

function updateJob(container, job) {
  const status = setField(container, "status", job.status);
  if (status) status.className = `status status-${job.status}`;
  const progress = container.querySelector('[data-field="progress"]');
  if (progress) progress.value = job.progress.fraction;
  setField(container, "percent", `${Math.round(job.progress.fraction * 100)} %`);
  setField(container, "phase", job.progress.phase || "—");
  setField(container, "message", job.progress.message || "");
  setField(container, "started", formatTime(job.started_at));
  setField(container, "finished", formatTime(job.finished_at));
  setField(container, "log", job.log_tail || "");
  const done = FINISHED.includes(job.status);
  const note = job.cancel_requested && !done ? "Cancel requested; the job stops at its next step." : "";
  setField(container, "cancel-note", note);
  const errorBox = container.querySelector('[data-field="error-box"]');
  if (errorBox) {
    errorBox.hidden = !job.error;
    setField(container, "error", job.error || "");
  }
  const links = container.querySelector('[data-field="result-links"]');
  if (links && job.status === "succeeded") {
    const targets = [["sensitivity_result_id", "/sensitivity/", "Sensitivity result"], ["plan_id", "/plans/", "Plan"]];
    links.replaceChildren(...targets.filter(([key]) => job.result[key]).map(([key, prefix, label]) => {
      const link = document.createElement("a");
      link.href = prefix + encodeURIComponent(job.result[key]);
      link.textContent = label;
      return link;
    }));
  }
  if (done) {
    container.dataset.finished = "true";
    document.getElementById("cancel-form")?.remove();
  }
}

function pollJob(container) {
  const tick = async () => {
    if (container.dataset.finished === "true") return;
    try {
      const response = await fetch(`/jobs/${container.dataset.jobId}/status`, { headers: { Accept: "application/json" } });
      if (response.ok) updateJob(container, await response.json());
    } catch {
      // the server is restarting: keep polling
    }
    if (container.dataset.finished !== "true") setTimeout(tick, POLL_MS);
  };
  setTimeout(tick, POLL_MS);
}

function initCancel() {
  const form = document.getElementById("cancel-form");
  const container = document.getElementById("job");
  if (!form || !container) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    const response = await fetch(`/jobs/${container.dataset.jobId}/cancel`, {
      method: "POST", headers: { Accept: "application/json", ...csrfHeaders() },
    });
    if (response.ok) {
      updateJob(container, await response.json());
    } else {
      button.disabled = false;
      setField(container, "cancel-note", `Cancel failed: ${await problemText(response)}`);
    }
  });
}

function initJobs() {
  for (const container of document.querySelectorAll('.job[data-finished="false"]')) pollJob(container);
  initCancel();
}

initUpload();
initSensitivity();
initFrontier();
initLatency();
initJobs();
