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

const AXIS_TITLES = {
  size_bytes: "size (bytes)", bops: "BOPS", latency_ms: "latency, mean (ms)",
};
const BUDGET_FOR_AXIS = { size_bytes: "max_size_bytes", bops: "max_bops", latency_ms: "max_latency_ms" };
const LOG_AXES = ["size_bytes", "bops"];  // these span an order of magnitude between fp32 and 4-bit

function frontierTraces(data, x, y) {
  const has = (p) => p[x] != null && p[y] != null;
  const points = data.points.filter(has).sort((a, b) => a[x] - b[x]);
  const hover = `point %{customdata}<br>${AXIS_TITLES[x]}: %{x:.4g}<br>%{y:.4g}<extra></extra>`;
  // The staircase joins the frontier in (cost, prediction); measured metrics are points only.
  const traces = [{
    type: "scatter", mode: y === "metric" ? "markers" : "lines+markers", name: "frontier", x: points.map((p) => p[x]),
    y: points.map((p) => p[y]), customdata: points.map((p) => p.index), hovertemplate: hover,
    marker: { size: 11, color: "#0b5cad" }, line: { shape: "hv", color: "#0b5cad", width: 1 },
  }];
  const baselines = data.baselines.filter(has);
  if (baselines.length) {
    traces.push({
      type: "scatter", mode: "markers+text", name: "uniform baselines", x: baselines.map((b) => b[x]),
      y: baselines.map((b) => b[y]), text: baselines.map((b) => b.candidate), textposition: "top center",
      customdata: baselines.map((b) => b.index), marker: { symbol: "diamond", size: 12, color: "#d55e00" },
      hovertemplate: "uniform %{text}<br>%{x:.4g}<br>%{y:.4g}<extra></extra>",
    });
  }
  const chosen = points.filter((p) => p.chosen);
  if (chosen.length) {
    traces.push({
      type: "scatter", mode: "markers", name: "chosen", x: chosen.map((p) => p[x]), y: chosen.map((p) => p[y]),
      customdata: chosen.map((p) => p.index), hovertemplate: hover,
      marker: { symbol: "star", size: 18, color: "#e69f00", line: { color: "#000", width: 1 } },
    });
  }
  const selected = points.filter((p) => p.index === data.selected);
  traces.push({
    type: "scatter", mode: "markers", name: "selected", x: selected.map((p) => p[x]), y: selected.map((p) => p[y]),
    customdata: selected.map((p) => p.index), hovertemplate: hover, showlegend: selected.length > 0,
    marker: { size: 22, color: "rgba(0,0,0,0)", line: { color: "#000", width: 2.5 } },
  });
  return traces;
}

function constraintShapes(data, x, y) {
  // Budget lines (vertical, on the matching x axis) and the drop tolerance (horizontal, on the metric).
  const shapes = [];
  const annotations = [];
  const budget = data.constraints[BUDGET_FOR_AXIS[x]];
  if (budget != null) {
    // Shapes take data values on log axes, annotations take log10 of them.
    const at = LOG_AXES.includes(x) ? Math.log10(budget) : budget;
    shapes.push({ type: "line", xref: "x", yref: "paper", x0: budget, x1: budget, y0: 0, y1: 1,
                  line: { color: "#b42318", dash: "dash", width: 2 } });
    annotations.push({ xref: "x", yref: "paper", x: at, y: 1, text: `${BUDGET_FOR_AXIS[x]} = ${budget}`,
                       showarrow: false, xanchor: "left", yanchor: "bottom", font: { color: "#b42318" } });
  }
  if (y === "metric" && data.float_metric != null) {
    shapes.push({ type: "line", xref: "paper", yref: "y", x0: 0, x1: 1, y0: data.float_metric, y1: data.float_metric,
                  line: { color: "#7a7a7a", dash: "dot", width: 1.5 } });
    annotations.push({ xref: "paper", yref: "y", x: 0, y: data.float_metric, text: "float baseline",
                       showarrow: false, xanchor: "left", yanchor: "bottom" });
    const maxDrop = data.constraints.max_drop;
    if (maxDrop != null) {
      const floor = data.float_metric - maxDrop;
      shapes.push({ type: "line", xref: "paper", yref: "y", x0: 0, x1: 1, y0: floor, y1: floor,
                    line: { color: "#b42318", dash: "dash", width: 2 } });
      annotations.push({ xref: "paper", yref: "y", x: 1, y: floor, text: `max_drop = ${maxDrop} pp`,
                         showarrow: false, xanchor: "right", yanchor: "top", font: { color: "#b42318" } });
    }
  }
  return { shapes, annotations };
}

function drawFrontier(data) {
  const x = document.getElementById("frontier-x").value;
  const y = document.getElementById("frontier-y").value;
  const yTitle = y === "metric" ? `measured ${data.metric_name} (%)` : data.predictor_label;
  const layout = { ...PLOT_LAYOUT, margin: { t: 30, r: 20, b: 60, l: 80 }, ...constraintShapes(data, x, y),
                   xaxis: { title: { text: AXIS_TITLES[x] }, exponentformat: "SI",
                           type: LOG_AXES.includes(x) ? "log" : "linear" }, yaxis: { title: { text: yTitle } },
                   legend: { orientation: "h", y: -0.2 } };
  Plotly.react("frontier-chart", frontierTraces(data, x, y), layout, PLOT_CONFIG);
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

// ------------------------------------------------------------------ latency chart

function initLatency() {
  const data = readJSON("latency-data");
  if (!data || !canPlot("latency-chart")) return;
  const traces = data.devices.map((d) => ({
    type: "bar", name: d.device, x: d.labels,
    y: d.mean_ms, hovertemplate: "mean %{y:.3f} ms<extra>%{fullData.name}</extra>",
    error_y: { type: "data", symmetric: false, array: d.p90_ms.map((v, i) => Math.max(0, v - d.mean_ms[i])),
               arrayminus: d.p50_ms.map((v, i) => Math.max(0, d.mean_ms[i] - v)), visible: true },
  }));
  Plotly.newPlot("latency-chart", traces, { ...PLOT_LAYOUT,
                                            yaxis: { automargin: true, title: { text: "latency (ms): mean, p50–p90" } },
                                            legend: { orientation: "h", y: 1.1 } }, PLOT_CONFIG);
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
