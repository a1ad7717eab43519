// A generic parser of the Prometheus text exposition format, and the two series the
// console charts. Metric names may change: anything missing is reported as null.

/** Parse exposition text into [{name, labels, value}]; comments and bad lines skipped. */
export function parseMetrics(text) {
  const samples = [];
  const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/;
  for (const raw of text.split("\n")) {
    const s = raw.trim();
    if (!s || s.startsWith("#")) continue;
    const m = line.exec(s);
    if (!m) continue;
    const value = Number(m[4] === "+Inf" ? Infinity : m[4] === "-Inf" ? -Infinity : m[4]);
    if (Number.isNaN(value) && m[4] !== "NaN") continue;
    samples.push({ name: m[1], labels: parseLabels(m[3] || ""), value });
  }
  return samples;
}

function parseLabels(text) {
  const labels = {};
  const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  let m;
  while ((m = re.exec(text))) {
    labels[m[1]] = m[2].replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
  }
  return labels;
}

/** Sum of the samples whose name passes `test`; null when there are none. */
export function total(samples, test) {
  const hits = samples.filter((s) => test(s.name) && Number.isFinite(s.value));
  return hits.length ? hits.reduce((sum, s) => sum + s.value, 0) : null;
}

/** The server's count of sync requests, one sample per outcome and error code
 * (docs/operations.md). */
export const SYNCS = "crdtsync_sync_requests_total";

/** Sum of the samples named `name` whose labels pass `test`; null when there are none. */
export function totalOf(samples, name, test = () => true) {
  return total(samples.filter((s) => test(s.labels)), (n) => n === name);
}

/** Sync requests answered, and those answered with an error (any outcome but `ok`). */
export const syncs = (samples) => totalOf(samples, SYNCS);
export const syncErrors = (samples) => totalOf(samples, SYNCS, (labels) => labels.outcome !== "ok");

/** The first sample named `name` (any labels), or null. */
export function first(samples, name) {
  const hit = samples.find((s) => s.name === name);
  return hit ? hit.value : null;
}
