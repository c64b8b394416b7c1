"use strict";
// The loraforge dashboard: plain DOM code over the public API (/v1/models, /v1/adapters,
// /v1/files, /v1/fine_tuning/jobs, /v1/completions). No framework and no build step: the page
// ships inside the Python package and must work offline. Every value from the API goes into the
// page as text (textContent), never as HTML.

const KEY_STORAGE = "loraforge.apiKey";
// While a job is queued or running, its row and loss curve follow it closely; otherwise the
// page only looks for changes made elsewhere (another tab, curl, a finished job).
const POLL_ACTIVE_MS = 1500;
const POLL_IDLE_MS = 5000;
const ACTIVE = new Set(["validating_files", "queued", "running"]);
const SVG_NS = "http://www.w3.org/2000/svg";
const SMOOTHING = 0.8; // weight of the past in the training curve's moving average
// The server says in the page whether it runs with --api-key, so the page need not probe the
// API (and log a 401) just to find out.
const AUTH_REQUIRED =
  document.querySelector('meta[name="loraforge-auth"]').content === "required";

const $ = (id) => document.getElementById(id);

const state = {
  unlocked: false,
  timer: null,
  baseModels: [],
  models: [], // /v1/models cards, base first
  adapters: new Map(), // adapter id -> /v1/adapters object (rank, format, residency)
  files: [],
  jobs: [], // newest first
  progress: new Map(), // job id -> newest step event's data ({step, total_steps, tokens_per_sec})
  selected: null, // the job shown in the detail panel
  selectedStatus: null,
  events: new Map(), // the selected job's events by id
  tryAbort: null,
};

// -- the API ------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

/** fetch() with the key; the JSON answer, or the Response itself with raw: true (streams).
 *  A 4xx/5xx throws ApiError with the server's message, which says what to do. */
async function api(path, { method = "GET", json, form, signal, raw = false } = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser writes the multipart boundary itself
  }
  const response = await fetch(path, { method, headers, body, signal });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const error = (await response.json()).error;
      if (error && error.message) message = error.message;
    } catch {
      // not an OpenAI error object (a proxy's page, say): the status line will do
    }
    if (response.status === 401 && AUTH_REQUIRED) lock(message);
    throw new ApiError(response.status, message);
  }
  return raw ? response : response.json();
}

// -- small helpers ------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatTime(unix) {
  if (!unix) return "—";
  return new Date(unix * 1000).toLocaleString([], { dateStyle: "short", timeStyle: "medium" });
}

function formatDuration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MB`;
  return `${(n / 1024 ** 3).toFixed(2)} GB`;
}

function formatNumber(n) {
  return n === null || n === undefined ? "—" : n.toLocaleString();
}

let noticeTimer = null;
function notice(text, kind = "info") {
  const box = $("notice");
  box.textContent = text;
  box.className = kind;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => (box.textContent = ""), kind === "error" ? 12000 : 5000);
}

/** An event handler whose failures are shown on the page (a 401 has already locked it). */
function guarded(handler) {
  return async (event) => {
    try {
      await handler(event);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) notice(error.message, "error");
    }
  };
}

/** Put one <tr> per item into `tbody`, in order, reusing the rows already there (by key), so a
 *  refresh never replaces a button under the user's pointer. */
function syncRows(tbody, items, keyOf, create, update) {
  const existing = new Map([...tbody.children].map((tr) => [tr.dataset.key, tr]));
  let previous = null;
  for (const item of items) {
    const key = keyOf(item);
    let tr = existing.get(key);
    if (tr) existing.delete(key);
    else {
      tr = create(item);
      tr.dataset.key = key;
    }
    update(tr, item);
    const wanted = previous ? previous.nextSibling : tbody.firstChild;
    if (tr !== wanted) tbody.insertBefore(tr, wanted);
    previous = tr;
  }
  for (const tr of existing.values()) tr.remove();
}

/** Replace a <select>'s options, keeping the chosen value when it is still there. */
function fillSelect(select, options, { empty } = {}) {
  const current = select.value;
  const wanted = [...(empty ? [["", empty]] : []), ...options];
  const same =
    select.options.length === wanted.length &&
    wanted.every(([value, label], i) => select.options[i].value === value && select.options[i].text === label);
  if (same) return;
  select.replaceChildren(...wanted.map(([value, label]) => el("option", { value }, label)));
  if (wanted.some(([value]) => value === current)) select.value = current;
}

// -- the key prompt -----------------------------------------------------------------------------
function lock(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  state.unlocked = false;
  clearTimeout(state.timer);
  if (state.tryAbort) state.tryAbort.abort();
  $("dashboard").hidden = true;
  $("forget-key").hidden = true;
  $("base-model").textContent = "";
  $("key-prompt").hidden = false;
  $("key-error").hidden = !message;
  $("key-error").textContent = message || "";
  $("key-input").focus();
}

async function unlock() {
  await loadModels(); // the first call that needs the key: a wrong one stops here (lock)
  state.unlocked = true;
  $("key-prompt").hidden = true;
  $("dashboard").hidden = false;
  $("forget-key").hidden = !AUTH_REQUIRED;
  await Promise.all([loadFiles(), loadJobs()]);
  schedule();
}

$("key-form").addEventListener(
  "submit",
  guarded(async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
    $("key-input").value = "";
    await unlock();
  }),
);
$("forget-key").addEventListener("click", () => lock());

// -- models and adapters ------------------------------------------------------------------------
async function loadModels() {
  const [models, adapters] = await Promise.all([api("/v1/models"), api("/v1/adapters")]);
  state.models = models.data;
  state.adapters = new Map(adapters.data.map((a) => [a.id, a]));
  state.baseModels = state.models.filter((m) => !m.parent).map((m) => m.id);
  $("base-model").textContent = `base model: ${state.baseModels.join(", ")}`;
  syncRows($("models"), state.models, (m) => m.id, createModelRow, updateModelRow);
  fillSelect(document.querySelector("#job-form [name=model]"), state.baseModels.map((id) => [id, id]));
  fillSelect(
    document.querySelector("#try-form [name=model]"),
    state.models.map((m) => [m.id, m.id]),
  );
}

function modelKind(card, adapter) {
  if (!card.parent) return "base";
  return adapter && adapter.fine_tuning_job_id ? "fine-tune" : "adapter";
}

function createModelRow(card) {
  const tr = el("tr", { "data-testid": "model-row" });
  for (let i = 0; i < 6; i++) tr.append(el("td"));
  const actions = el(
    "td",
    { class: "actions" },
    el("button", { type: "button", class: "link", onclick: () => tryModel(card.id) }, "Try"),
  );
  if (card.parent) {
    actions.append(
      el(
        "button",
        {
          type: "button",
          class: "link danger",
          "data-testid": "adapter-delete",
          onclick: guarded(() => deleteAdapter(card.id)),
        },
        "Delete",
      ),
    );
  }
  tr.append(actions);
  return tr;
}

function updateModelRow(tr, card) {
  const adapter = state.adapters.get(card.id);
  const resident = !card.parent || (adapter && adapter.loaded);
  const cells = [
    card.id,
    modelKind(card, adapter),
    adapter ? String(adapter.rank) : "—",
    adapter ? adapter.source_format : "—",
    resident ? "yes" : "no",
    formatTime(card.created),
  ];
  cells.forEach((text, i) => (tr.cells[i].textContent = text));
  tr.cells[0].className = "mono";
  tr.cells[0].title = adapter ? `${adapter.targets.join(", ")} · ${formatBytes(adapter.size_bytes)}` : "";
}

function tryModel(id) {
  document.querySelector("#try-form [name=model]").value = id;
  document.querySelector("#try-form [name=prompt]").focus();
}

async function deleteAdapter(id) {
  if (!confirm(`Delete ${id}? Requests already running finish with it; new ones get 404.`)) return;
  await api(`/v1/adapters/${encodeURIComponent(id)}`, { method: "DELETE" });
  notice(`Deleted ${id}`);
  await loadModels();
}

$("adapter-form").addEventListener(
  "submit",
  guarded(async (event) => {
    event.preventDefault();
    const form = event.target;
    const file = form.elements.file.files[0];
    // The archive's name without its extension is the usual adapter name.
    const name = form.elements.name.value.trim() || file.name.replace(/\.(tar\.gz|tgz|tar|zip)$/i, "");
    const body = new FormData();
    body.append("name", name);
    body.append("file", file);
    const adapter = await api("/v1/adapters", { method: "POST", form: body });
    form.reset();
    notice(`Registered ${adapter.id} (rank ${adapter.rank}, ${adapter.source_format})`);
    await loadModels();
  }),
);

// -- files --------------------------------------------------------------------------------------
async function loadFiles() {
  state.files = (await api("/v1/files")).data;
  syncRows(
    $("files"),
    state.files,
    (f) => f.id,
    () => el("tr", { "data-testid": "file-row" }, el("td", { class: "mono" }), ...[1, 2, 3, 4].map(() => el("td"))),
    (tr, f) =>
      [f.id, f.filename, formatBytes(f.bytes), f.purpose, formatTime(f.created_at)].forEach(
        (text, i) => (tr.cells[i].textContent = text),
      ),
  );
  const training = state.files
    .filter((f) => f.purpose === "fine-tune")
    .map((f) => [f.id, `${f.filename} (${f.id})`]);
  fillSelect(document.querySelector("#job-form [name=training_file]"), training);
  fillSelect(document.querySelector("#job-form [name=validation_file]"), training, { empty: "none" });
}

$("file-form").addEventListener(
  "submit",
  guarded(async (event) => {
    event.preventDefault();
    const form = event.target;
    const body = new FormData();
    body.append("purpose", "fine-tune");
    body.append("file", form.elements.file.files[0]);
    const file = await api("/v1/files", { method: "POST", form: body });
    form.reset();
    notice(`Uploaded ${file.filename} as ${file.id}`);
    await loadFiles();
    document.querySelector("#job-form [name=training_file]").value = file.id;
  }),
);

// -- jobs ---------------------------------------------------------------------------------------
async function loadJobs() {
  state.jobs = (await api("/v1/fine_tuning/jobs?limit=20")).data;
  // A running job's progress is in its newest step event; a finished job's is read once.
  await Promise.all(
    state.jobs
      .filter((job) => ACTIVE.has(job.status) || !state.progress.has(job.id))
      .filter((job) => job.id !== state.selected) // the detail panel reads those events itself
      .map(async (job) => {
        const events = (await api(`/v1/fine_tuning/jobs/${job.id}/events?limit=20`)).data;
        state.progress.set(job.id, newestProgress(events));
      }),
  );
  $("jobs-empty").hidden = state.jobs.length > 0;
  syncRows($("jobs"), state.jobs, (j) => j.id, createJobRow, updateJobRow);
}

function newestProgress(events) {
  // events arrive newest first; the step total comes with every step event
  const step = events.find((e) => e.data && e.data.total_steps !== undefined && e.data.step !== undefined);
  const speed = events.find((e) => e.data && e.data.tokens_per_sec !== undefined);
  return {
    step: step ? step.data.step : null,
    total: step ? step.data.total_steps : null,
    tokensPerSec: speed ? speed.data.tokens_per_sec : null,
  };
}

function createJobRow(job) {
  const cancel = el(
    "button",
    {
      type: "button",
      class: "link danger",
      "data-testid": "job-cancel",
      onclick: guarded(async (event) => {
        event.stopPropagation(); // cancelling is not selecting
        await api(`/v1/fine_tuning/jobs/${job.id}/cancel`, { method: "POST" });
        notice(`Cancelled ${job.id}`);
        await loadJobs();
        if (state.selected === job.id) await loadDetail();
      }),
    },
    "Cancel",
  );
  const tr = el(
    "tr",
    { "data-testid": "job-row", class: "selectable", tabindex: "0" },
    el("td", {}, el("span", { class: "mono" }), el("br"), el("small", { class: "muted" })),
    el("td", {}, el("span", { "data-testid": "job-status" })),
    el(
      "td",
      { class: "nowrap" },
      el("span", { "data-testid": "job-progress" }),
      el("progress", { max: "1", value: "0" }),
    ),
    el("td", { "data-testid": "job-speed", class: "nowrap" }),
    el("td", { "data-testid": "job-eta", class: "nowrap" }),
    el("td", { class: "actions" }, cancel),
  );
  tr.addEventListener("click", guarded(() => selectJob(job.id)));
  tr.addEventListener("keydown", (event) => {
    if (event.key === "Enter") guarded(() => selectJob(job.id))();
  });
  return tr;
}

function updateJobRow(tr, job) {
  const progress = state.progress.get(job.id) || {};
  const running = job.status === "running";
  tr.classList.toggle("selected", job.id === state.selected);
  tr.cells[0].firstChild.textContent = job.id;
  tr.cells[0].lastChild.textContent =
    job.fine_tuned_model || (job.suffix ? `${job.model} · ${job.suffix}` : job.model);
  const status = tr.querySelector("[data-testid=job-status]");
  status.textContent = job.status;
  status.className = `status status-${job.status}`;
  const bar = tr.querySelector("progress");
  if (progress.total) {
    tr.querySelector("[data-testid=job-progress]").textContent = `${progress.step} / ${progress.total}`;
    bar.value = job.status === "succeeded" ? 1 : progress.step / progress.total;
    bar.hidden = false;
  } else {
    tr.querySelector("[data-testid=job-progress]").textContent = job.status === "queued" ? "waiting" : "—";
    bar.hidden = true;
  }
  tr.cells[3].textContent =
    running && progress.tokensPerSec ? Math.round(progress.tokensPerSec).toLocaleString() : "—";
  tr.cells[4].textContent =
    running && job.estimated_finish ? formatDuration(job.estimated_finish - Date.now() / 1000) : "—";
  tr.querySelector("[data-testid=job-cancel]").hidden = !ACTIVE.has(job.status);
}

$("job-form").addEventListener(
  "submit",
  guarded(async (event) => {
    event.preventDefault();
    const f = event.target.elements;
    const body = { model: f.model.value, training_file: f.training_file.value };
    if (f.validation_file.value) body.validation_file = f.validation_file.value;
    if (f.suffix.value.trim()) body.suffix = f.suffix.value.trim();
    const hyperparameters = {};
    if (f.n_epochs.value) hyperparameters.n_epochs = Number(f.n_epochs.value);
    if (f.batch_size.value) hyperparameters.batch_size = Number(f.batch_size.value);
    if (f.learning_rate_multiplier.value) {
      hyperparameters.learning_rate_multiplier = Number(f.learning_rate_multiplier.value);
    }
    if (Object.keys(hyperparameters).length) body.hyperparameters = hyperparameters;
    const lora = {};
    if (f.rank.value) lora.rank = Number(f.rank.value);
    if (f.num_layers.value) lora.num_layers = Number(f.num_layers.value);
    if (f.mask_prompt.checked) lora.mask_prompt = true;
    if (f.completion_after.value) lora.completion_after = f.completion_after.value;
    if (Object.keys(lora).length) body.lora = lora;
    const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: body });
    notice(`Created ${job.id}`);
    await loadJobs();
    await selectJob(job.id);
    schedule(); // a queued job: poll at the fast rate from now on
  }),
);

// -- the selected job ---------------------------------------------------------------------------
async function selectJob(id) {
  state.selected = id;
  state.selectedStatus = null;
  state.events = new Map();
  for (const tr of $("jobs").children) tr.classList.toggle("selected", tr.dataset.key === id);
  $("detail-id").textContent = id;
  $("detail-empty").hidden = true;
  $("detail-body").hidden = false;
  $("loss-chart").replaceChildren();
  $("detail-events").replaceChildren();
  await loadDetail();
}

const eventNumber = (id) => Number(id.replace(/^\D+/, ""));

/** Read the selected job's events newer than those already here (pages are newest first). */
async function loadNewEvents(id) {
  let after = null;
  let added = 0;
  for (;;) {
    const query = after ? `limit=100&after=${encodeURIComponent(after)}` : "limit=100";
    const page = await api(`/v1/fine_tuning/jobs/${id}/events?${query}`);
    let reachedKnown = false;
    for (const event of page.data) {
      if (state.events.has(event.id)) {
        reachedKnown = true;
        break;
      }
      state.events.set(event.id, event);
      added++;
    }
    if (reachedKnown || !page.has_more || page.data.length === 0) return added;
    after = page.data[page.data.length - 1].id;
  }
}

async function loadDetail() {
  const id = state.selected;
  if (!id) return;
  const [job, added] = await Promise.all([api(`/v1/fine_tuning/jobs/${id}`), loadNewEvents(id)]);
  if (state.selected !== id) return; // another job was selected meanwhile
  state.selectedStatus = job.status;
  const events = [...state.events.values()].sort((a, b) => eventNumber(b.id) - eventNumber(a.id));
  state.progress.set(id, newestProgress(events));
  renderSettings(job);
  if (added || !$("loss-chart").hasChildNodes()) {
    renderEvents(events);
    drawLossChart($("loss-chart"), events);
  }
  const row = [...$("jobs").children].find((tr) => tr.dataset.key === id);
  if (row) updateJobRow(row, job);
}

function renderSettings(job) {
  const hp = job.hyperparameters;
  const lora = job.lora || {};
  const rows = [
    ["status", job.status],
    ["model", job.model],
    ["fine-tuned model", job.fine_tuned_model || "—"],
    ["training file", job.training_file],
    ["validation file", job.validation_file || "—"],
    ["epochs", hp.n_epochs],
    ["batch size", hp.batch_size],
    ["learning-rate multiplier", hp.learning_rate_multiplier],
    ["LoRA rank / alpha", `${lora.rank} / ${lora.alpha}`],
    ["LoRA layers", lora.num_layers ?? "all"],
    ["LoRA targets", (lora.targets || ["default"]).join(", ")],
    ["dropout", lora.dropout],
    ["max sequence length", lora.max_seq_len],
    ["quantized base", lora.quantize ? `${lora.quantize}-bit` : "no"],
    ["prompt masking", !lora.mask_prompt ? "off" : lora.completion_after ? `on, after “${lora.completion_after}”` : "on"],
    ["seed", job.seed],
    ["suffix", job.suffix || "—"],
    ["trained tokens", formatNumber(job.trained_tokens)],
    ["created", formatTime(job.created_at)],
    ["finished", formatTime(job.finished_at)],
  ];
  if (job.error) rows.push(["error", job.error.message]);
  $("detail-settings").replaceChildren(
    ...rows.flatMap(([name, value]) => [
      el("dt", {}, name),
      el("dd", { "data-setting": name }, String(value ?? "—")),
    ]),
  );
}

function renderEvents(events) {
  $("detail-events").replaceChildren(
    ...events.slice(0, 300).map((e) =>
      el(
        "li",
        { class: `level-${e.level}` },
        el("time", {}, new Date(e.created_at * 1000).toLocaleTimeString()),
        " ",
        e.message,
      ),
    ),
  );
}

// -- the loss chart -----------------------------------------------------------------------------
/** Round tick positions covering [lo, hi]: about `count` of them, at 1, 2 or 5 x 10^k. */
function niceTicks(lo, hi, count, integer = false) {
  const raw = (hi - lo) / Math.max(1, count - 1);
  const magnitude = 10 ** Math.floor(Math.log10(raw || 1));
  let step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || raw;
  if (integer) step = Math.max(1, Math.round(step));
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) {
    ticks.push(Number(t.toPrecision(12))); // no 0.30000000000000004 on the axis
  }
  return { ticks, step };
}

function lossSeries(events, field) {
  const byStep = new Map(); // a resumed run repeats steps: the newest value wins
  for (const e of [...events].reverse()) {
    if (e.type === "metrics" && e.data && typeof e.data[field] === "number") {
      byStep.set(e.data.step, e.data[field]);
    }
  }
  return [...byStep.entries()].sort((a, b) => a[0] - b[0]);
}

function drawLossChart(chart, events) {
  const W = 640, H = 260;
  const m = { left: 52, right: 16, top: 28, bottom: 40 };
  const train = lossSeries(events, "train_loss");
  const valid = lossSeries(events, "valid_loss");
  const totals = events.filter((e) => e.data && e.data.total_steps).map((e) => e.data.total_steps);
  chart.replaceChildren();
  if (!train.length && !valid.length) {
    const attrs = { x: W / 2, y: H / 2, class: "chart-empty", "text-anchor": "middle" };
    chart.append(svg("text", attrs, "The loss curve starts with the first training step."));
    return;
  }
  const points = [...train, ...valid];
  const xMax = Math.max(1, ...totals, ...points.map(([s]) => s));
  let yLo = Math.min(...points.map(([, v]) => v));
  let yHi = Math.max(...points.map(([, v]) => v));
  if (yHi - yLo < 1e-6) {
    yLo -= 0.5;
    yHi += 0.5;
  }
  const yTicks = niceTicks(yLo, yHi, 5);
  yLo = Math.min(yLo, yTicks.ticks[0]);
  yHi = Math.max(yHi, yTicks.ticks[yTicks.ticks.length - 1]);
  const x = (step) => m.left + (step / xMax) * (W - m.left - m.right);
  const y = (loss) => H - m.bottom - ((loss - yLo) / (yHi - yLo)) * (H - m.top - m.bottom);

  const xAxis = svg("g", { class: "axis", "data-axis": "step" });
  xAxis.append(svg("line", { x1: m.left, x2: W - m.right, y1: H - m.bottom, y2: H - m.bottom }));
  for (const t of niceTicks(0, xMax, 8, true).ticks) {
    xAxis.append(svg("line", { x1: x(t), x2: x(t), y1: H - m.bottom, y2: H - m.bottom + 5 }));
    xAxis.append(svg("text", { x: x(t), y: H - m.bottom + 18, "text-anchor": "middle" }, String(t)));
  }
  const xMid = (m.left + W - m.right) / 2;
  const title = { "text-anchor": "middle", class: "axis-title" };
  xAxis.append(svg("text", { x: xMid, y: H - 4, ...title }, "step"));

  const yAxis = svg("g", { class: "axis", "data-axis": "loss" });
  yAxis.append(svg("line", { x1: m.left, x2: m.left, y1: m.top, y2: H - m.bottom }));
  const decimals = Math.max(0, -Math.floor(Math.log10(yTicks.step)));
  for (const t of yTicks.ticks) {
    yAxis.append(svg("line", { x1: m.left, x2: W - m.right, y1: y(t), y2: y(t), class: "grid" }));
    yAxis.append(svg("text", { x: m.left - 6, y: y(t) + 4, "text-anchor": "end" }, t.toFixed(decimals)));
  }
  const yMid = (m.top + H - m.bottom) / 2;
  yAxis.append(svg("text", { x: 14, y: yMid, transform: `rotate(-90 14 ${yMid})`, ...title }, "loss"));
  chart.append(yAxis, xAxis);

  // Per-step training loss is noisy (one small batch each); a moving average over it shows the
  // trend, drawn over the faint raw line.
  if (train.length > 2) {
    let average = train[0][1];
    const smoothed = train.map(([s, v]) => [s, (average = SMOOTHING * average + (1 - SMOOTHING) * v)]);
    const coords = smoothed.map(([s, v]) => `${x(s).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { class: "series smoothed", "data-series": "train-smoothed", points: coords }));
  }
  const series = [
    ["train", "training loss", train],
    ["valid", "validation loss", valid],
  ];
  let legendX = m.left + 8;
  for (const [name, label, data] of series) {
    if (!data.length) continue;
    const coords = data.map(([s, v]) => `${x(s).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { class: `series ${name}`, "data-series": name, points: coords }));
    // Few validation points (one per checkpoint), and the newest training point: show them.
    const marked = name === "valid" ? data : data.slice(-1);
    for (const [s, v] of marked) {
      chart.append(svg("circle", { class: `marker ${name}`, cx: x(s), cy: y(v), r: 3 }));
    }
    chart.append(svg("line", { class: `series ${name}`, x1: legendX, x2: legendX + 18, y1: 12, y2: 12 }));
    const last = data[data.length - 1];
    const legend = `${label} ${last[1].toFixed(3)} @ ${last[0]}`;
    chart.append(svg("text", { x: legendX + 24, y: 16, class: "legend" }, legend));
    legendX += 220;
  }
}

// -- try it -------------------------------------------------------------------------------------
$("try-form").addEventListener(
  "submit",
  guarded(async (event) => {
    event.preventDefault();
    const f = event.target.elements;
    const body = {
      model: f.model.value,
      prompt: f.prompt.value,
      max_tokens: Number(f.max_tokens.value || 64),
      temperature: Number(f.temperature.value || 0),
      stream: true,
    };
    if (f.sql.checked) body.structured_outputs = { sql: "from_prompt" };
    const output = $("try-output");
    output.textContent = "";
    output.classList.remove("error");
    $("try-status").textContent = "…";
    const controller = new AbortController();
    state.tryAbort = controller;
    $("try-stop").hidden = false;
    try {
      const finish = await streamCompletion(body, controller.signal, (text) => output.append(text));
      $("try-status").textContent = finish ? `finish_reason: ${finish}` : "";
    } catch (error) {
      if (error.name === "AbortError") {
        $("try-status").textContent = "stopped";
        return;
      }
      $("try-status").textContent = "";
      output.classList.add("error");
      output.textContent = error.message;
    } finally {
      state.tryAbort = null;
      $("try-stop").hidden = true;
    }
  }),
);
$("try-stop").addEventListener("click", () => state.tryAbort && state.tryAbort.abort());

/** POST a streaming completion; `onText` gets each piece of text as it arrives. Resolves to
 *  the finish_reason; an error sent inside the stream is thrown as one. */
async function streamCompletion(body, signal, onText) {
  const response = await api("/v1/completions", { method: "POST", json: body, signal, raw: true });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const message = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of message.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          if (choice.text) onText(choice.text);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
}

// -- polling ------------------------------------------------------------------------------------
function schedule() {
  clearTimeout(state.timer);
  if (!state.unlocked) return;
  const busy = state.jobs.some((job) => ACTIVE.has(job.status));
  state.timer = setTimeout(tick, busy ? POLL_ACTIVE_MS : POLL_IDLE_MS);
}

async function tick() {
  try {
    const before = new Map(state.jobs.map((job) => [job.id, job.status]));
    await loadJobs();
    const selected = state.jobs.find((job) => job.id === state.selected);
    const changed = selected && selected.status !== state.selectedStatus;
    if (selected && (ACTIVE.has(selected.status) || changed)) await loadDetail();
    // A job that just succeeded has registered its model; residency changes with traffic.
    const finished = state.jobs.some((job) => ACTIVE.has(before.get(job.id)) && !ACTIVE.has(job.status));
    const idle = !state.jobs.some((job) => ACTIVE.has(job.status));
    if (finished || idle) await Promise.all([loadModels(), loadFiles()]);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) notice(error.message, "error");
  }
  schedule();
}

// -- start --------------------------------------------------------------------------------------
if (AUTH_REQUIRED && !apiKey()) lock();
else guarded(unlock)();
