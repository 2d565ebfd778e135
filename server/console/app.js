// The console: the tasks (GET /tasks, /tasks/{task}), an image classified by the chosen tasks in
// one mixed batch (POST /classify?tasks=), and a live panel from /metrics. Plain DOM, no framework;
// text from the server is only ever set as textContent.

import { parseMetrics, snapshot, summarize } from "./metrics.js";

const $ = (selector) => document.querySelector(selector);
const params = new URLSearchParams(location.search);
const REFRESH_S = Math.max(0.2, Number(params.get("refresh")) || 3); // ?refresh=SECONDS
const WINDOW_S = 30; // the live panel's figures cover at most the last 30 s
const TOKEN_KEY = "piggyback-token";
const ROOT = new URL("..", location.href); // the console is served at <root>/console/

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  tasks: new Map(), // name -> {summary, detail, row}
  order: [],
  next: null,
  chosen: new Set(),
  image: null,
  preview: null,
  sequence: 0,
  samples: [],
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** fetch() under the server's root, with the token; an error answer throws its `detail`. */
async function call(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  let response;
  try {
    response = await fetch(new URL(path, ROOT), { ...options, headers });
  } catch {
    throw new ApiError(0, "cannot reach the server");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (typeof body.detail === "string") message = body.detail;
    } catch {
      // not JSON (a proxy's page): the status line says enough
    }
    throw new ApiError(response.status, message);
  }
  return response;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function showError(message) {
  $("#error").textContent = message;
  $("#error").hidden = false;
}

function fail(error) {
  if (error.status === 401) {
    $("#token-form").hidden = false;
    $("#token-message").textContent = error.message;
    $("#token").focus();
  } else {
    showError(error.message);
  }
}

// --- tasks ---------------------------------------------------------------------------------------

async function loadTasks(reset) {
  const query = new URLSearchParams({ limit: "100" });
  if (!reset && state.next) query.set("after", state.next);
  let page;
  try {
    page = await (await call(`tasks?${query}`)).json();
  } catch (error) {
    fail(error);
    if (error.status === 503 || error.status === 0) setTimeout(() => loadTasks(reset), 2000); // starting
    return;
  }
  $("#token-form").hidden = true;
  $("#error").hidden = true;
  if (reset) {
    state.tasks.clear();
    state.order = [];
    $("#tasks tbody").replaceChildren();
  }
  for (const summary of page.tasks) {
    const entry = { summary, detail: null, row: null };
    state.tasks.set(summary.task, entry);
    state.order.push(summary.task);
    entry.row = taskRow(entry);
    $("#tasks tbody").append(entry.row);
  }
  if (reset && state.chosen.size === 0 && state.order.length > 0) choose(state.order[0], true);
  state.next = page.next;
  $("#more").hidden = page.next === null;
  $("#tasks-count").textContent = `${page.total}`;
  const failed = Object.entries(page.failed);
  $("#failed").hidden = failed.length === 0;
  $("#failed").textContent = failed.length ? `not loaded: ${failed.map(([name]) => name).join(", ")}` : "";
  filter();
  await loadDetails(page.tasks.map((t) => t.task));
}

/** Each task's labels and residency (GET /tasks/{task}), four at a time. */
async function loadDetails(names) {
  const queue = [...names];
  const worker = async () => {
    while (queue.length > 0) {
      const name = queue.shift();
      try {
        const detail = await (await call(`tasks/${encodeURIComponent(name)}`)).json();
        const entry = state.tasks.get(name);
        if (entry) {
          entry.detail = detail;
          fillRow(entry);
        }
      } catch (error) {
        if (error.status !== 404) fail(error); // 404: deleted meanwhile
      }
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
}

function taskRow(entry) {
  const name = entry.summary.task;
  const box = element("input", { type: "checkbox", "aria-label": `classify with ${name}` });
  box.checked = state.chosen.has(name);
  box.addEventListener("change", () => {
    choose(name, box.checked);
    classify();
  });
  const row = element("tr", { "data-task": name });
  row.append(element("td", {}, box), element("td", { text: name, class: "name" }));
  for (const cell of ["labels", "version", "size", "resident"]) row.append(element("td", { class: cell }));
  fillRow({ ...entry, row });
  return row;
}

function fillRow({ summary, detail, row }) {
  const cell = (name) => row.querySelector(`.${name}`);
  cell("version").textContent = summary.version.slice(0, 8);
  cell("version").title = summary.version;
  if (detail === null) {
    cell("labels").textContent = `${summary.num_labels} labels`;
    cell("size").textContent = cell("resident").textContent = "…";
    return;
  }
  const shown = detail.labels.slice(0, 4).join(", ");
  cell("labels").textContent = detail.labels.length > 4 ? `${shown}, … (${detail.labels.length})` : shown;
  cell("labels").title = detail.labels.join(", ");
  const r = detail.residency;
  cell("size").textContent = bytes(r.packed_bytes);
  cell("size").title = "masks, head and per-task BatchNorm (always resident)";
  cell("resident").textContent = r.pinned ? "pinned" : r.built_bytes > 0 ? "yes" : "no";
  cell("resident").title = r.built_bytes > 0
    ? `built weights held in the cache: ${bytes(r.built_bytes)}`
    : "built weights not held: built for each batch";
}

function choose(name, on) {
  if (on) state.chosen.add(name);
  else state.chosen.delete(name);
  const box = state.tasks.get(name)?.row?.querySelector("input");
  if (box) box.checked = on;
  const names = chosenTasks();
  $("#chosen").textContent = names.length ? `with ${names.join(", ")}` : "choose a task";
}

function chosenTasks() {
  return state.order.filter((name) => state.chosen.has(name));
}

function filter() {
  const text = $("#filter").value.trim().toLowerCase();
  for (const [name, entry] of state.tasks) entry.row.hidden = text !== "" && !name.includes(text);
}

// --- classification ------------------------------------------------------------------------------

function useImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name || "what was dropped"} is not an image (${file.type})`);
    return;
  }
  state.image = file;
  if (state.preview) URL.revokeObjectURL(state.preview);
  state.preview = URL.createObjectURL(file);
  $("#preview").src = state.preview;
  $("#preview").hidden = false;
  classify();
}

async function classify() {
  const names = chosenTasks();
  if (!state.image || names.length === 0) return;
  const topK = Math.min(1000, Math.max(1, Number($("#top-k").value) || 5));
  const form = new FormData();
  form.append("image", state.image, state.image.name || "image");
  const query = new URLSearchParams({ tasks: names.join(","), top_k: String(topK) });
  const sequence = ++state.sequence;
  const started = performance.now();
  $("#results").setAttribute("aria-busy", "true");
  try {
    const body = await (await call(`classify?${query}`, { method: "POST", body: form })).json();
    if (sequence !== state.sequence) return; // a newer request is on its way
    showResults(body.results, performance.now() - started);
    $("#error").hidden = true;
    loadDetails(names); // their residency may have changed
  } catch (error) {
    if (sequence === state.sequence) fail(error);
  } finally {
    if (sequence === state.sequence) $("#results").removeAttribute("aria-busy");
  }
}

function showResults(results, ms) {
  const cards = results.map((result) => {
    const meta = `${ms.toFixed(0)} ms · batch of ${result.batch_size}` + (results.length > 1 ? ` · ${results.length} tasks` : "");
    const bars = element("ol", { class: "bars" });
    for (const p of result.predictions) {
      const fill = element("span", { class: "fill" });
      fill.style.width = `${(100 * p.score).toFixed(2)}%`; // CSSOM: allowed by the style-src policy
      bars.append(
        element(
          "li",
          { class: "bar", "data-label": p.label, "data-score": String(p.score) },
          element("span", { class: "label", text: p.label, title: `index ${p.index}` }),
          element("span", { class: "track" }, fill),
          element("span", { class: "score", text: `${(100 * p.score).toFixed(1)}%` }),
        ),
      );
    }
    return element(
      "article",
      { class: "result", "data-task": result.task },
      element("h3", {}, element("span", { text: result.task }), element("span", { class: "muted latency", text: meta })),
      bars,
    );
  });
  $("#results").replaceChildren(...cards);
}

// --- the live panel ------------------------------------------------------------------------------

function seconds(s) {
  return s < 1 ? `${(1000 * s).toFixed(s < 0.01 ? 1 : 0)} ms` : `${s.toFixed(2)} s`;
}

async function refreshStats() {
  try {
    const text = await (await call("metrics")).text();
    const now = snapshot(parseMetrics(text), performance.now() / 1000);
    state.samples.push(now);
    while (now.t - state.samples[0].t > WINDOW_S) state.samples.shift();
    const figures = summarize(state.samples.length > 1 ? state.samples[0] : null, now);
    const show = (name, value, text) => {
      const cell = $(`#stats [data-stat="${name}"]`);
      cell.textContent = value === null ? "–" : text;
      if (value === null) delete cell.dataset.value;
      else cell.dataset.value = String(value);
    };
    show("throughput", figures.throughput, `${figures.throughput?.toFixed(1)} req/s`);
    show("p50", figures.p50, seconds(figures.p50));
    show("p99", figures.p99, seconds(figures.p99));
    show("queue", figures.queue, String(figures.queue));
    show("hit-rate", figures.hitRate, `${(100 * figures.hitRate).toFixed(0)}%`);
    show("requests", figures.requests, String(figures.requests));
    show("errors", figures.errors, String(figures.errors));
    show("tasks", figures.tasks, String(figures.tasks));
    $("#stats-window").textContent = figures.window === null ? "latency since start" : `last ${Math.max(1, Math.round(figures.window))} s`;
    $("#stats-error").hidden = true;
  } catch (error) {
    $("#stats-error").textContent = error.status === 401 ? `metrics: ${error.message}` : error.message;
    $("#stats-error").hidden = false;
  } finally {
    setTimeout(refreshStats, REFRESH_S * 1000);
  }
}

async function describeServer() {
  try {
    const ready = await (await call("readyz")).json();
    $("#server").textContent = `${ready.backbone} · ${ready.device} · ${ready.dtype}`;
  } catch (error) {
    // 401 (ops_need_token): asked again once a token is given; else still starting
    $("#server").textContent = error.status === 401 ? "" : "starting…";
    if (error.status !== 401) setTimeout(describeServer, 2000);
  }
}

// --- wiring --------------------------------------------------------------------------------------

$("#token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("#token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  loadTasks(true).then(classify);
  if ($("#server").textContent === "") describeServer();
});
$("#image").addEventListener("change", (event) => useImage(event.target.files[0]));
$("#top-k").addEventListener("change", classify);
$("#filter").addEventListener("input", filter);
$("#more").addEventListener("click", () => loadTasks(false));
// a file dropped anywhere on the page is classified (and never opened by the browser instead)
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  $("#drop").classList.add("over");
});
document.addEventListener("dragleave", () => $("#drop").classList.remove("over"));
document.addEventListener("drop", (event) => {
  event.preventDefault();
  $("#drop").classList.remove("over");
  useImage(event.dataTransfer?.files?.[0]);
});
document.addEventListener("paste", (event) => {
  const item = [...(event.clipboardData?.items || [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (item) {
    event.preventDefault();
    useImage(item.getAsFile());
  }
});
$("#drop").addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") $("#image").click();
});

describeServer();
loadTasks(true);
refreshStats();
