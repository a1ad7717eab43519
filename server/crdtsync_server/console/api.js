// The admin API as the console uses it: the token from sessionStorage in the
// Authorization header of every call (never in a URL), JSON in and out, and the
// change feed's Server-Sent Events read with fetch() (EventSource cannot send headers).

const KEY = "crdtsync.adminToken";

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error && body.error.code;
  }
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${token.get() || ""}`, ...extra };
}

/** One JSON call; throws ApiError for an error answer. */
export async function call(method, path, body, signal) {
  const init = { method, headers: headers(), signal, cache: "no-store" };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(path, init);
  const data = resp.status === 204 ? null : await resp.json().catch(() => null);
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

export const get = (path, signal) => call("GET", path, undefined, signal);

/** The metrics text (Prometheus exposition format). */
export async function metricsText(signal) {
  const resp = await fetch("/v1/metrics", { headers: headers(), signal, cache: "no-store" });
  if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
  return resp.text();
}

export const q = (params) => {
  const search = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") search.set(k, v);
  const text = search.toString();
  return text ? `?${text}` : "";
};

/**
 * Follow /v1/feed/stream until `signal` aborts: onItem(kind, item) for every event.
 * Reconnects after a dropped connection from the last cursor seen (Last-Event-ID).
 */
export async function followFeed(params, onItem, signal, onStatus = () => {}) {
  let last = params.after || "0";
  while (!signal.aborted) {
    try {
      const resp = await fetch(`/v1/feed/stream${q({ ...params, after: undefined })}`, {
        headers: headers({ "Last-Event-ID": last, Accept: "text/event-stream" }),
        signal, cache: "no-store",
      });
      if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
      onStatus("live");
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = parseFrame(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (frame.id) last = frame.id;
          if (frame.data === null) continue;
          const item = JSON.parse(frame.data);
          if (frame.event === "error") throw new ApiError(410, item);
          onItem(frame.event || "message", item);
        }
      }
    } catch (err) {
      if (signal.aborted) return;
      onStatus(`reconnecting (${err.message})`);
      if (err instanceof ApiError && (err.status === 401 || err.status === 410)) {
        onStatus(`stopped: ${err.message}`);
        return;
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function parseFrame(text) {
  const frame = { id: null, event: null, data: null };
  for (const line of text.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") frame.id = value;
    else if (field === "event") frame.event = value;
    else if (field === "data") frame.data = frame.data === null ? value : `${frame.data}\n${value}`;
  }
  return frame;
}
