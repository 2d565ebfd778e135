// The live panel's figures, from the server's own /metrics (Prometheus text format): counters are
// cumulative, so a figure over a window is the difference of two scrapes.

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

function number(text) {
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);
}

/** Prometheus text → a Map from sample name to [{labels, value}]. */
export function parseMetrics(text) {
  const samples = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = SAMPLE.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, key, raw] of (m[2] || "").matchAll(LABEL)) {
      labels[key] = raw.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    if (!samples.has(m[1])) samples.set(m[1], []);
    samples.get(m[1]).push({ labels, value: number(m[3]) });
  }
  return samples;
}

function total(samples, name, keep = () => true) {
  return (samples.get(name) || []).filter((s) => keep(s.labels)).reduce((a, s) => a + s.value, 0);
}

/** A histogram's cumulative buckets summed over its other labels: [[upper bound, count]], sorted. */
export function buckets(samples, name) {
  const sums = new Map();
  for (const { labels, value } of samples.get(`${name}_bucket`) || []) {
    const le = number(labels.le);
    sums.set(le, (sums.get(le) || 0) + value);
  }
  return [...sums].sort((a, b) => a[0] - b[0]);
}

/** Prometheus's histogram_quantile: linear within the bucket that holds the rank; the highest
 * finite bound when the rank falls in the +Inf bucket; null with no observation. */
export function quantile(q, cumulative) {
  if (cumulative.length === 0) return null;
  const count = cumulative[cumulative.length - 1][1];
  if (!(count > 0)) return null;
  const rank = q * count;
  let lower = 0;
  let below = 0;
  for (const [upper, seen] of cumulative) {
    if (seen >= rank) {
      if (upper === Infinity) return lower;
      return lower + ((upper - lower) * (rank - below)) / (seen - below);
    }
    lower = upper;
    below = seen;
  }
  return lower;
}

/** What the panel needs from one scrape, at time t (seconds). */
export function snapshot(samples, t) {
  return {
    t,
    ok: total(samples, "piggyback_requests_total", (l) => l.status === "200"),
    all: total(samples, "piggyback_requests_total"),
    latency: buckets(samples, "piggyback_request_duration_seconds"),
    queue: total(samples, "piggyback_queue_depth"),
    hits: total(samples, "piggyback_weight_cache_hits_total"),
    misses: total(samples, "piggyback_weight_cache_misses_total"),
    tasks: total(samples, "piggyback_tasks_loaded"),
  };
}

function minus(a, b) {
  const before = new Map(b);
  return a.map(([le, n]) => [le, n - (before.get(le) || 0)]);
}

/** The panel's figures between two snapshots (`since` older than `now`); the latency quantiles
 * and the hit rate over the whole life of the server when nothing happened in between. */
export function summarize(since, now) {
  const dt = since ? now.t - since.t : 0;
  const windowed = since && now.all > since.all;
  const latency = windowed ? minus(now.latency, since.latency) : now.latency;
  const batches = since && now.hits + now.misses > since.hits + since.misses;
  const hits = batches ? now.hits - since.hits : now.hits;
  const lookups = batches ? hits + now.misses - since.misses : now.hits + now.misses;
  return {
    window: windowed ? dt : null,
    throughput: since && dt > 0 ? (now.ok - since.ok) / dt : null,
    p50: quantile(0.5, latency),
    p99: quantile(0.99, latency),
    queue: now.queue,
    hitRate: lookups > 0 ? hits / lookups : null,
    requests: now.ok,
    errors: now.all - now.ok,
    tasks: now.tasks,
  };
}
