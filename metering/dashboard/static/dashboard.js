// The usage dashboard. Reads the API with the key the user entered (kept in this tab's
// session storage, sent as the IM-API-KEY header, never in a URL); draws with Plotly.js.
"use strict";

const KEY = "metering.dashboard.key";
const COLOURS = { ok: "#3b7dd8", warning: "#e0a000", soft: "#f07000", hard: "#c62828" };
const PERIODS = {
  hour: { unit: "minute", span: 3600e3 },
  day: { unit: "hour", span: 86400e3 },
  month: { unit: "day", span: 31 * 86400e3 },
};
let overview = null;
let liveTimer = null;

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, params = {}) {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined) url.searchParams.set(k, v);
  let response;
  try {
    response = await fetch(url, { headers: { "IM-API-KEY": sessionStorage.getItem(KEY) || "" } });
  } catch (e) {
    throw new ApiError(0, "The engine cannot be reached (" + e.message + ")");
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : "HTTP " + response.status;
    throw new ApiError(response.status, message);
  }
  return body.result;
}

function showLogin(message) {
  clearInterval(liveTimer);
  sessionStorage.removeItem(KEY);
  $("main").hidden = true;
  $("forget").hidden = true;
  $("who").textContent = "";
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

function fail(e) {
  if (e.status === 401 || e.status === 403) {
    showLogin("That key was refused: " + e.message);
  } else {
    $("error").textContent = e.message;
  }
}

// intervalId (yyyy-mm-dd:hh:mm, yyyy-mm-dd:hh, yyyy-mm-dd, yyyy-mm) to an ISO time, UTC.
function periodStart(id) {
  const [day, hh, mm] = id.split(":");
  const date = day.length === 7 ? day + "-01" : day;
  return `${date}T${hh || "00"}:${mm || "00"}:00Z`;
}

function selection() {
  const value = $("entity").value;
  return value === "account" ? null : Number(value);
}

// The period chosen, at the resolution chosen (each period suggests one when picked).
function window_() {
  const period = $("period").value;
  if (period !== "range") {
    const end = Date.now();
    return { unit: $("unit").value, start: end - PERIODS[period].span, end };
  }
  const start = Date.parse($("start").value);
  const end = Date.parse($("end").value);
  if (Number.isNaN(start) || Number.isNaN(end)) throw new ApiError(400, "Choose both ends of the range.");
  if (start >= end) throw new ApiError(400, "The range must start before it ends.");
  return { unit: $("unit").value, start, end };
}

const UNIT_MS = { minute: 60e3, hour: 3600e3, day: 86400e3 };
const MAX_PERIODS = 1000; // what one graph asks the API for

function checked(w) {
  const periods = Math.ceil((w.end - w.start) / UNIT_MS[w.unit]);
  if (periods > MAX_PERIODS) {
    throw new ApiError(400, `That is ${periods} periods ${$("unit").selectedOptions[0].text}: ` +
      `at most ${MAX_PERIODS} fit one graph. Choose a coarser resolution or a shorter period.`);
  }
  return w;
}

// The account's quota and hard limit across the whole period shown (an app has none of its own).
function limitLines(metric, span) {
  if (selection() !== null || !overview) return [];
  const f = overview.figures[metric];
  const lines = [];
  for (const [name, value, dash] of [["quota", f.quota, "dash"], ["hard limit", f.hard, "dot"]]) {
    if (value === null || value === undefined) continue;
    lines.push({ x: span, y: [value, value], name, mode: "lines",
                 line: { dash, color: name === "quota" ? COLOURS.soft : COLOURS.hard } });
  }
  return lines;
}

function bandChart(target, entries, field, metric, label, w) {
  const empty = $(`${target}-empty`);
  const chart = $(`${target}-chart`);
  const summary = $(`${target}-summary`);
  if (!entries.length) {
    Plotly.purge(chart);
    chart.hidden = true;
    empty.hidden = false;
    empty.textContent = "No usage recorded for this period.";
    summary.textContent = "";
    return;
  }
  chart.hidden = false;
  empty.hidden = true;
  const x = entries.map((e) => periodStart(e.intervalId));
  const span = [new Date(w.start).toISOString(), new Date(w.end).toISOString()];
  const low = entries.map((e) => e[`${field}.min`]);
  const high = entries.map((e) => e[`${field}.peak`]);
  const mean = entries.map((e) => e[`${field}.mean`]);
  const traces = [
    // Markers too: a period of one point has no line to draw.
    { x, y: low, name: "min", mode: "lines+markers", line: { width: 1, color: "#9bb8e8" } },
    { x, y: high, name: "peak", mode: "lines+markers", fill: "tonexty",
      line: { width: 1, color: "#3b7dd8" }, fillcolor: "rgba(59,125,216,0.2)" },
    { x, y: mean, name: "mean", mode: "lines+markers", line: { width: 2, color: "#1b3d78" } },
    ...limitLines(metric, span),
  ];
  Plotly.react(chart, traces, {
    margin: { t: 10, r: 10, b: 40, l: 50 }, yaxis: { title: label, rangemode: "tozero" },
    xaxis: { range: span, type: "date" },
    legend: { orientation: "h" },
  }, { displaylogo: false, responsive: true });
  const peak = Math.max(...high);
  const at = entries[high.indexOf(peak)];
  const when = field === "connections.all" && at["connections.all.peakAt"]
    ? new Date(at["connections.all.peakAt"]).toISOString().replace(".000Z", "Z") : at.intervalId;
  summary.textContent = `Peak ${peak} (${when}), lowest ${Math.min(...low)}, ` +
    `mean of the periods ${(mean.reduce((a, b) => a + b, 0) / mean.length).toFixed(2)}`;
  summary.dataset.peak = String(peak);
}

function messagesChart(entries, w) {
  const chart = $("messages-chart");
  const empty = $("messages-empty");
  const total = entries.reduce((a, e) => a + e["messages.all.count"], 0);
  if (!entries.length || total === 0) {
    Plotly.purge(chart);
    chart.hidden = true;
    empty.hidden = false;
    empty.textContent = "No messages in this period.";
    return;
  }
  chart.hidden = false;
  empty.hidden = true;
  const x = entries.map((e) => periodStart(e.intervalId));
  Plotly.react(chart, [
    { x, y: entries.map((e) => e["messages.published.count"]), name: "published", type: "bar" },
    { x, y: entries.map((e) => e["messages.delivered.count"]), name: "delivered", type: "bar" },
  ], { barmode: "stack", margin: { t: 10, r: 10, b: 40, l: 50 }, legend: { orientation: "h" },
       xaxis: { type: "date", range: [new Date(w.start).toISOString(), new Date(w.end).toISOString()] } },
  { displaylogo: false, responsive: true });
}

function monthBars(view) {
  $("month-name").textContent = `(${view.month}, UTC)`;
  $("package").textContent = view.package
    ? `Package ${view.package.name}. Bars: usage; dashed: quota; dotted: hard limit.`
    : "This account is on no package: no limits apply.";
  const holder = $("month-bars");
  holder.replaceChildren();
  // Every cell first: each chart then takes its own cell's width.
  for (const [metric, f] of Object.entries(view.figures)) {
    const div = document.createElement("div");
    div.className = "bar";
    div.id = `month-${metric}`;
    div.dataset.usage = String(f.usage);
    div.dataset.level = f.level;
    holder.appendChild(div);
  }
  for (const [metric, f] of Object.entries(view.figures)) {
    const div = $(`month-${metric}`);
    const when = f.at ? ` at ${new Date(f.at).toISOString().replace(".000Z", "Z")}` : "";
    const shapes = [];
    for (const [value, dash, colour] of [[f.quota, "dash", COLOURS.soft], [f.hard, "dot", COLOURS.hard]]) {
      if (value !== null && value !== undefined) {
        shapes.push({ type: "line", x0: value, x1: value, y0: -0.5, y1: 0.5, line: { dash, color: colour, width: 2 } });
      }
    }
    const top = Math.max(f.usage, f.hard || 0, f.quota || 0, 1) * 1.1;
    Plotly.react(div, [{
      type: "bar", orientation: "h", x: [f.usage], y: [metric], marker: { color: COLOURS[f.level] },
      text: [`${f.usage}`], textposition: "auto", hoverinfo: "x",
    }], {
      width: div.clientWidth || 260, height: 150,
      title: { text: `${metric}: ${f.usage}${when} (${f.level})`, font: { size: 12 } },
      margin: { t: 30, r: 10, b: 30, l: 80 }, xaxis: { range: [0, top] }, shapes,
    }, { displaylogo: false, staticPlot: true });
  }
}

function alertsTable(view) {
  const list = $("rejections");
  list.replaceChildren();
  const lines = view.rejections.length ? view.rejections : ["No rejection in force."];
  if (view.override) lines.push(`Staff override in force: ${view.override.reason}`);
  for (const text of lines) {
    const li = document.createElement("li");
    li.textContent = text;
    list.appendChild(li);
  }
  const table = $("alerts");
  const body = table.querySelector("tbody");
  body.replaceChildren();
  table.hidden = !view.alerts.length;
  $("alerts-empty").hidden = view.alerts.length > 0;
  for (const a of view.alerts) {
    const tr = document.createElement("tr");
    const delivered = Object.entries(a.deliveries).map(([c, s]) => `${c}: ${s}`).join(", ");
    for (const cell of [a.detectedAt, a.month, a.metric, a.level, a.usage, a.threshold, delivered]) {
      const td = document.createElement("td");
      td.textContent = String(cell);
      tr.appendChild(td);
    }
    tr.className = `level-${a.level}`;
    body.appendChild(tr);
  }
}

async function refreshLive() {
  try {
    const live = await api("/v1/dashboard/live", { app: selection() });
    $("live-count").textContent = String(live.connections);
    $("live-detail").textContent =
      `WebSocket ${live.websocket}, streaming ${live.streaming}, long polling ${live.long_poll}`;
  } catch (e) {
    fail(e);
  }
}

async function show() {
  $("error").textContent = "";
  try {
    const w = checked(window_());
    overview = await api("/v1/dashboard/overview");
    const entries = await api("/v1/dashboard/series", { unit: w.unit, start: Math.floor(w.start),
                                                        end: Math.ceil(w.end), app: selection() });
    bandChart("conns", entries, "connections.all", "connections", "connections", w);
    bandChart("channels", entries, "channels", "channels", "channels", w);
    messagesChart(entries, w);
    monthBars(overview);
    alertsTable(overview);
  } catch (e) {
    fail(e);
  }
}

async function open_() {
  try {
    overview = await api("/v1/dashboard/overview");
  } catch (e) {
    fail(e);
    return;
  }
  $("login").hidden = true;
  $("main").hidden = false;
  $("forget").hidden = false;
  $("who").textContent = `Account ${overview.account.id}: ${overview.account.name}`;
  const entity = $("entity");
  entity.replaceChildren(new Option(`Account ${overview.account.name} (all apps)`, "account"));
  for (const app of overview.apps) entity.appendChild(new Option(`App ${app.id}: ${app.name}`, String(app.id)));
  await show();
  clearInterval(liveTimer);
  await refreshLive();
  liveTimer = setInterval(refreshLive, 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    open_();
  });
  $("forget").addEventListener("click", () => showLogin(""));
  $("period").addEventListener("change", () => {
    const period = $("period").value;
    $("range").hidden = period !== "range";
    if (PERIODS[period]) $("unit").value = PERIODS[period].unit;
  });
  $("entity").addEventListener("change", () => { show(); refreshLive(); });
  $("controls").addEventListener("submit", (event) => { event.preventDefault(); show(); });
  if (sessionStorage.getItem(KEY)) open_();
});
