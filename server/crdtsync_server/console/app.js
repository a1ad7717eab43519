// The crdtsync web console: a single page whose views are chosen by the URL fragment
// (#/devices, #/device/<id>, #/fleets, #/fleet/<id>, #/sinks, #/sink/<name>, #/metrics).
// Everything is built with DOM calls and textContent (no innerHTML): device data never
// becomes markup. See docs/console.md.

import { ApiError, call, followFeed, get, metricsText, q, token } from "./api.js";
import { first, parseMetrics, syncErrors, syncs, SYNCS } from "./metrics.js";

const PAGE = 50;
const ONLINE_MS = 5 * 60 * 1000;
const TAIL = 100;

const $ = (id) => document.getElementById(id);
let viewAbort = new AbortController();

/** An element: h("td", {class: "x", dataset: {k: "v"}}, "text", child, ...). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const json = (v) => JSON.stringify(v);
const when = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) + "Z" : "never");

function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

const online = (d) => !!d.last_sync && Date.now() - d.last_sync < ONLINE_MS;

function table(headers, rows, attrs = {}) {
  return h("table", attrs, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows));
}

function show(...nodes) {
  $("view").replaceChildren(...nodes);
}

function problem(err) {
  return h("p", { class: "error", role: "alert" }, err.message || String(err));
}

/** Parse a JSON text typed in a form; an empty field is null. */
function parseInput(text) {
  return text.trim() === "" ? null : JSON.parse(text);
}

// --- token -----------------------------------------------------------------------------

/** Take a token from the fragment (#token=...), keep it, and drop it from the address bar. */
function tokenFromFragment() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (!m) return;
  token.set(decodeURIComponent(m[1]));
  history.replaceState(null, "", `${location.pathname}${location.search}#/devices`);
}

function showLogin(message = "") {
  viewAbort.abort();
  $("nav").hidden = true;
  $("view").replaceChildren();
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("token").focus();
}

async function start() {
  tokenFromFragment();
  if (!token.get()) return showLogin();
  try {
    await get(`/v1/devices${q({ limit: 1 })}`);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      token.clear();
      return showLogin("That token was refused.");
    }
  }
  $("login").hidden = true;
  $("nav").hidden = false;
  route();
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  token.set($("token").value.trim());
  $("token").value = "";
  start();
});

$("logout").addEventListener("click", () => {
  token.clear();
  showLogin();
});

// --- routing ---------------------------------------------------------------------------

const VIEWS = [
  [/^#\/device\/(.+)$/, deviceView],
  [/^#\/fleets$/, fleetsView],
  [/^#\/fleet\/(.+)$/, fleetView],
  [/^#\/sinks$/, sinksView],
  [/^#\/sink\/(.+)$/, sinkView],
  [/^#\/metrics$/, metricsView],
  [/^/, devicesView],
];

function route() {
  if (!token.get()) return showLogin();
  viewAbort.abort();
  viewAbort = new AbortController();
  const signal = viewAbort.signal;
  for (const [re, view] of VIEWS) {
    const m = re.exec(location.hash);
    if (!m) continue;
    view(...m.slice(1).map(decodeURIComponent), signal).catch((err) => {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status === 401) {
        token.clear();
        showLogin("The token was refused.");
      } else {
        $("view").append(problem(err));
      }
    });
    return;
  }
}

window.addEventListener("hashchange", () => {
  if (/(?:^#|&)token=/.test(location.hash)) return start();
  route();
});

// --- paging ----------------------------------------------------------------------------

/**
 * A list paged with the API's `after`/`limit`: only one page is ever loaded. `load(after)`
 * returns {rows, next}; `render(rows)` the table.
 */
function pager(load, render, signal) {
  const box = h("div");
  const before = []; // the `after` of each earlier page, for "Previous"
  let current = null;
  async function show(after) {
    const { rows, next } = await load(after);
    if (signal.aborted) return;
    current = after;
    const prev = h("button", { type: "button", disabled: before.length === 0, onclick: () => show(before.pop()) }, "Previous");
    const nextBtn = h("button", {
      type: "button", disabled: !next,
      onclick: () => { before.push(current); show(next); },
    }, "Next");
    box.replaceChildren(render(rows),
      h("div", { class: "pager" }, prev, nextBtn,
        h("span", { class: "muted" }, `page ${before.length + 1}, ${rows.length} shown`)));
  }
  return { box, show };
}

// --- devices ---------------------------------------------------------------------------

function deviceRow(d) {
  const on = online(d);
  return h("tr", { dataset: { device: d.id } },
    h("td", {}, h("a", { href: `#/device/${encodeURIComponent(d.id)}` }, d.id)),
    h("td", { class: on ? "online" : "offline" }, d.disabled ? "disabled" : on ? "online" : "offline"),
    h("td", { title: when(d.last_sync) }, ago(d.last_sync)),
    h("td", {}, d.fleet ? h("a", { href: `#/fleet/${encodeURIComponent(d.fleet)}` }, d.fleet) : "—"),
    h("td", {}, d.last_seq ?? ""),
    h("td", {}, d.events_lost || 0),
    h("td", { class: "pending" }, d.downlink_pending || 0));
}

const deviceTable = (rows) => table(
  ["Device", "Status", "Last sync", "Fleet", "Last event seq", "Events lost", "Pending to device"],
  rows.map(deviceRow), { id: "devices" });

async function devicesView(signal) {
  const list = pager(async (after) => {
    const page = await get(`/v1/devices${q({ after, limit: PAGE })}`, signal);
    return { rows: page.devices, next: page.next };
  }, deviceTable, signal);
  show(h("h1", {}, "Devices"),
    h("p", { class: "muted" }, `Online: synced in the last ${ONLINE_MS / 60000} minutes. `
      + `${PAGE} per page, read from the API one page at a time.`),
    list.box);
  await list.show(null);
}

// --- one device ------------------------------------------------------------------------

async function feedHead(signal) {
  // The feed's newest cursor, from the metrics; 0 (replay this device's kept history)
  // when the server does not expose it.
  try {
    const head = first(parseMetrics(await metricsText(signal)), "crdtsync_feed_head");
    return head === null ? "0" : String(Math.max(0, Math.floor(head)));
  } catch (err) {
    if (signal.aborted) throw err;
    return "0";
  }
}

async function deviceView(id, signal) {
  const path = `/v1/devices/${encodeURIComponent(id)}`;
  // The head first, then the state: every change after the head is applied on top, so
  // nothing between the two reads is missed (a change applied twice gives the same value).
  const head = await feedHead(signal);
  const [device, state] = await Promise.all([get(path, signal), get(`${path}/state`, signal)]);
  const live = h("span", { id: "live", class: "muted" }, "connecting");
  const info = h("p", { id: "device-info" });
  const renderInfo = (d) => info.replaceChildren(
    h("span", { class: online(d) ? "online" : "offline" }, online(d) ? "online" : "offline"),
    ` · last sync ${ago(d.last_sync)} (${when(d.last_sync)}) · fleet ${d.fleet || "—"}`,
    ` · created ${when(d.created)}${d.disabled ? " · DISABLED" : ""}`);
  renderInfo(device);

  const stateBody = h("tbody");
  const cells = new Map();
  function setValue(map, key, value, flash) {
    const k = `${map}\u0000${key}`;
    let row = cells.get(k);
    if (value === null) {
      if (row) row.remove();
      cells.delete(k);
      return;
    }
    if (!row) {
      row = h("tr", { dataset: { map, key } }, h("td", {}, map), h("td", {}, key), h("td", { class: "value" }));
      cells.set(k, row);
      const after = [...cells.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
      stateBody.replaceChildren(...after.map(([, r]) => r));
    }
    const cell = row.lastChild;
    cell.textContent = json(value);
    if (flash) {
      cell.classList.remove("flash");
      void cell.offsetWidth; // restart the animation
      cell.classList.add("flash");
    }
  }
  for (const [map, keys] of Object.entries(state || {})) {
    for (const [key, value] of Object.entries(keys || {})) setValue(map, key, value, false);
  }

  const tail = h("tbody");
  function addTail(item) {
    const what = item.kind === "event" ? item.topic : item.kind === "conflict" ? "conflict" : "state";
    const body = item.kind === "event" ? item.body : item.kind === "conflict" ? item.conflict : item.changes;
    tail.prepend(h("tr", { dataset: { cursor: item.cursor } },
      h("td", {}, when(item.received)), h("td", {}, item.kind), h("td", {}, what),
      h("td", { class: "value" }, json(body))));
    while (tail.childElementCount > TAIL) tail.lastChild.remove();
  }
  // The recent events of the last thousand feed items, then the live tail.
  const recent = await get(`/v1/feed${q({ device: id, kind: "event", after: String(Math.max(0, Number(head) - 1000)), limit: 1000 })}`, signal)
    .catch(() => ({ items: [] }));
  for (const item of recent.items.slice(-TAIL)) addTail(item);

  const commands = h("tbody", { id: "commands" });
  show(
    h("p", {}, h("a", { href: "#/devices" }, "← devices")),
    h("h1", {}, "Device ", h("code", {}, id), " ", live),
    info,
    h("div", { class: "cols" },
      h("div", {},
        h("h2", {}, "State"),
        h("table", { id: "state" }, h("thead", {}, h("tr", {}, h("th", {}, "Map"), h("th", {}, "Key"), h("th", {}, "Value"))), stateBody),
        stateForm(path, signal)),
      h("div", {},
        h("h2", {}, "Send"),
        messageForm(path, signal),
        commandForm(path, commands, signal),
        table(["Command", "Status", "Result"], [], { id: "command-results" }))),
    h("h2", {}, "Event tail"),
    h("table", { id: "tail" }, h("thead", {}, h("tr", {}, ["Received", "Kind", "Topic", "Body"].map((x) => h("th", {}, x)))), tail));
  $("command-results").querySelector("tbody").replaceWith(commands);

  followFeed({ device: id, after: head }, (kind, item) => {
    if (kind === "state" && item.doc === "state") {
      for (const [map, keys] of Object.entries(item.changes || {})) {
        for (const [key, value] of Object.entries(keys || {})) setValue(map, key, value, true);
      }
      if (item.source === "device") {
        device.last_sync = Math.max(device.last_sync || 0, item.received);
        renderInfo(device);
      }
    }
    addTail(item);
  }, signal, (status) => { live.textContent = status; live.className = status === "live" ? "online" : "muted"; });
}

/** Run `action()` when `form` is submitted; it returns the text to show in `status`, and
 * a failure shows its message there as an error. */
function onSubmit(form, status, action) {
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      status.textContent = await action(form.elements);
      status.className = "muted";
    } catch (err) {
      status.textContent = err.message;
      status.className = "error";
    }
  });
  return form;
}

function stateForm(path, signal) {
  const status = h("span", { class: "muted" });
  const form = h("form", { class: "inline", id: "state-form" },
    h("input", { type: "text", name: "map", value: "state", size: 8, "aria-label": "map" }),
    h("input", { type: "text", name: "key", placeholder: "key", required: true, size: 12, "aria-label": "key" }),
    h("input", { type: "text", name: "value", placeholder: "JSON value (empty: delete)", size: 20, "aria-label": "value" }),
    h("button", { type: "submit" }, "Write"), status);
  return onSubmit(form, status, async (f) => {
    await call("PATCH", `${path}/state/${encodeURIComponent(f.map.value)}`,
      { [f.key.value]: parseInput(f.value.value) }, signal);
    return "written; the device gets it at its next sync";
  });
}

function messageForm(path, signal) {
  const status = h("span", { class: "muted", id: "message-status" });
  const form = h("form", { class: "inline", id: "message-form" },
    h("input", { type: "text", name: "topic", placeholder: "topic", required: true, size: 10, "aria-label": "topic" }),
    h("input", { type: "text", name: "body", placeholder: "JSON body", size: 20, "aria-label": "message body" }),
    h("button", { type: "submit" }, "Send message"), status);
  return onSubmit(form, status, async (f) => {
    const item = await call("POST", `${path}/messages`,
      { topic: f.topic.value, body: parseInput(f.body.value) }, signal);
    return `message ${item.id} queued`;
  });
}

function commandForm(path, commands, signal) {
  const status = h("span", { class: "muted" });
  const form = h("form", { class: "inline", id: "command-form" },
    h("input", { type: "text", name: "method", placeholder: "method", required: true, size: 10, "aria-label": "method" }),
    h("input", { type: "text", name: "params", placeholder: "JSON params", size: 20, "aria-label": "params" }),
    h("button", { type: "submit" }, "Send command"), status);
  return onSubmit(form, status, async (f) => {
    const item = await call("POST", `${path}/commands`,
      { method: f.method.value, params: parseInput(f.params.value) }, signal);
    status.textContent = "";
    const row = h("tr", { dataset: { command: item.id } });
    commands.prepend(row);
    await watchCommand(item, row, signal);
    return "";
  });
}

const FINAL = new Set(["succeeded", "failed", "expired"]);

/** Show a command's status, long-polling its result until it is final. */
async function watchCommand(item, row, signal) {
  for (;;) {
    const result = item.error ? `${item.error.code}: ${item.error.message}` : item.status === "succeeded" ? json(item.result) : "";
    row.replaceChildren(h("td", {}, `#${item.id} ${item.name}`), h("td", { class: "status" }, item.status),
      h("td", { class: "value result" }, result));
    if (FINAL.has(item.status) || signal.aborted) return;
    item = await get(`/v1/commands/${item.id}${q({ wait: 25 })}`, signal);
  }
}

// --- fleets ----------------------------------------------------------------------------

async function fleetsView(signal) {
  const list = pager(async (after) => {
    const page = await get(`/v1/fleets${q({ after, limit: PAGE })}`, signal);
    return { rows: page.fleets, next: page.next };
  }, (rows) => table(["Fleet", "Created", "Meta"], rows.map((f) => h("tr", { dataset: { fleet: f.id } },
    h("td", {}, h("a", { href: `#/fleet/${encodeURIComponent(f.id)}` }, f.id)),
    h("td", {}, when(f.created)), h("td", { class: "value" }, json(f.meta))))), signal);
  const env = await get("/v1/env", signal).catch((err) => ({ error: err.message }));
  show(h("h1", {}, "Fleets"), list.box, h("h2", {}, "Project environment"), h("pre", {}, JSON.stringify(env, null, 2)));
  await list.show(null);
}

async function fleetView(id, signal) {
  const path = `/v1/fleets/${encodeURIComponent(id)}`;
  const [fleet, templates, env, schema] = await Promise.all([
    get(path, signal), get(`${path}/templates`, signal), get(`${path}/env`, signal), get(`${path}/schema`, signal)]);
  const devices = pager(async (after) => {
    const page = await get(`${path}/devices${q({ after, limit: PAGE })}`, signal);
    return { rows: page.devices, next: page.next };
  }, deviceTable, signal);
  const pre = (v) => h("pre", {}, JSON.stringify(v, null, 2));
  show(h("p", {}, h("a", { href: "#/fleets" }, "← fleets")),
    h("h1", {}, "Fleet ", h("code", {}, id)),
    h("p", { class: "muted" }, `created ${when(fleet.created)}`), pre(fleet.meta),
    h("div", { class: "cols" },
      h("div", {}, h("h2", {}, "Templates"), table(["Topic", "Hash", "Definition"],
        Object.entries(templates).map(([topic, t]) => h("tr", {}, h("td", {}, topic), h("td", {}, h("code", {}, t.hash || "")),
          h("td", { class: "value" }, json(t.def)))), { id: "templates" })),
      h("div", {}, h("h2", {}, "Environment"), pre(env)),
      h("div", {}, h("h2", {}, "Schema"), schema.hash ? [h("p", {}, "version ", h("code", {}, schema.hash)), pre(schema.schema)]
        : h("p", { class: "muted" }, "no schema"))),
    h("h2", {}, "Devices"), devices.box);
  await devices.show(null);
}

// --- sinks -----------------------------------------------------------------------------

async function sinksView(signal) {
  const { sinks } = await get("/v1/sinks", signal);
  show(h("h1", {}, "Sinks"),
    sinks.length ? table(["Sink", "Kind", "State", "Lag", "Delivered", "Failures", "Dead letters", "Last error"],
      sinks.map((s) => h("tr", { dataset: { sink: s.name } },
        h("td", {}, h("a", { href: `#/sink/${encodeURIComponent(s.name)}` }, s.name)),
        h("td", {}, s.kind || s.type || ""), h("td", {}, s.status.state), h("td", {}, s.status.lag),
        h("td", {}, s.status.delivered), h("td", {}, s.status.failures),
        h("td", { class: s.status.dead_letters ? "error" : "" }, s.status.dead_letters),
        h("td", { class: "error" }, s.status.last_error || ""))), { id: "sinks" })
      : h("p", { class: "muted" }, "No sinks configured."));
}

async function sinkView(name, signal) {
  const path = `/v1/sinks/${encodeURIComponent(name)}`;
  const sink = await get(path, signal);
  const letters = pager(async (after) => {
    const page = await get(`${path}/dead-letters${q({ after, limit: PAGE })}`, signal);
    return { rows: page.dead_letters, next: page.next };
  }, (rows) => rows.length ? h("pre", { id: "dead-letters" }, rows.map((d) => JSON.stringify(d)).join("\n"))
    : h("p", { class: "muted" }, "No dead letters."), signal);
  show(h("p", {}, h("a", { href: "#/sinks" }, "← sinks")), h("h1", {}, "Sink ", h("code", {}, name)),
    h("pre", {}, JSON.stringify(sink, null, 2)), h("h2", {}, "Dead letters"), letters.box);
  await letters.show(null);
}

// --- metrics ---------------------------------------------------------------------------

const POINTS = 60;
const readings = [];

async function metricsView(signal) {
  const chart = h("div", { id: "chart" });
  const notes = h("p", { class: "muted", id: "metrics-notes" });
  const raw = h("tbody");
  show(h("h1", {}, "Sync rate and errors"),
    h("p", {}, h("span", { class: "legend-sync" }, "■ syncs/s"), "  ", h("span", { class: "legend-errors" }, "■ errors/s"),
      h("span", { class: "muted" }, " (from GET /v1/metrics every 5 s)")),
    chart, notes, h("h2", {}, "crdtsync series"), table(["Series", "Labels", "Value"], [], { id: "series" }));
  $("series").querySelector("tbody").replaceWith(raw);
  while (!signal.aborted) {
    const samples = parseMetrics(await metricsText(signal));
    readings.push({ t: Date.now(), sync: syncs(samples), errors: syncErrors(samples) });
    while (readings.length > POINTS + 1) readings.shift();
    drawChart(chart);
    const missing = [];
    if (readings.at(-1).sync === null) missing.push(`no ${SYNCS} (no sync served yet, or an older server)`);
    notes.textContent = missing.length ? `This server exposes ${missing.join(" and ")}: shown as no data.` : "";
    raw.replaceChildren(...samples.filter((s) => s.name.startsWith("crdtsync_")).slice(0, 200).map((s) =>
      h("tr", {}, h("td", {}, s.name), h("td", { class: "value" }, Object.entries(s.labels).map(([k, v]) => `${k}=${v}`).join(" ")),
        h("td", {}, s.value))));
    await new Promise((resolve) => setTimeout(resolve, 5000));
  }
}

/** Per-second rates between consecutive readings (a counter reset counts as 0). */
function rates(key) {
  const out = [];
  for (let i = 1; i < readings.length; i++) {
    const a = readings[i - 1], b = readings[i];
    if (a[key] === null || b[key] === null) { out.push(null); continue; }
    out.push(Math.max(0, (b[key] - a[key]) / ((b.t - a.t) / 1000 || 1)));
  }
  return out;
}

function drawChart(box) {
  const W = 600, H = 160, NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  svg.setAttribute("class", "chart");
  const series = { sync: rates("sync"), errors: rates("errors") };
  const top = Math.max(1, ...Object.values(series).flat().filter((v) => v !== null));
  for (const [name, values] of Object.entries(series)) {
    const pts = values.map((v, i) => (v === null ? null
      : `${(i / (POINTS - 1)) * (W - 40) + 30},${H - 15 - (v / top) * (H - 30)}`)).filter(Boolean);
    if (!pts.length) continue;
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("class", name);
    svg.append(line);
  }
  const label = document.createElementNS(NS, "text");
  label.setAttribute("x", 2);
  label.setAttribute("y", 12);
  label.textContent = `${top.toFixed(top < 10 ? 2 : 0)}/s`;
  svg.append(label);
  if (readings.length < 2) {
    const wait = document.createElementNS(NS, "text");
    wait.setAttribute("x", W / 2 - 60);
    wait.setAttribute("y", H / 2);
    wait.textContent = "collecting readings…";
    svg.append(wait);
  }
  box.replaceChildren(svg);
}

start();
