// The usage dashboard: asks for an admin key, reads the admin API's usage
// operation (GET /admin/v1/usage, grouped by model and a time bucket) and
// draws it with uPlot. Plain script, no build step, nothing from elsewhere.
//
// What each chart drew is published as `window.switchyardDashboard` (series,
// points, sums), so a test can compare it with the usage it seeded.
(() => {
  "use strict";

  const API = location.pathname.replace(/\/dashboard\/?$/, "");
  const KEY_STORE = "switchyard.adminKey";
  const RANGE_S = { "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400 };
  // The bucket of a range: enough points to see a shape, few enough to read.
  const GRAINS = [["minute", 60, 6 * 3600], ["hour", 3600, 14 * 86400], ["day", 86400, Infinity]];
  const COLORS = ["#3367d6", "#e8710a", "#188038", "#a142f4", "#d93025", "#12b5cb", "#f9ab00", "#5f6368"];
  const NUSD_PER_USD = 1e9;

  const $ = (id) => document.getElementById(id);
  const state = { key: sessionStorage.getItem(KEY_STORE) || "", charts: [], linkedModel: "", seq: 0 };

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path) {
    const resp = await fetch(API + path, { headers: { Authorization: "Bearer " + state.key } });
    const body = await resp.json().catch(() => null);
    if (!resp.ok) {
      const message = body && body.error ? body.error.message : resp.statusText;
      throw new ApiError(resp.status, message);
    }
    return body;
  }

  function show(status, message) {
    document.body.dataset.state = status;
    $("status").textContent = message;
  }

  // --- who the key is, and which tenants it may see ---------------------

  async function signIn() {
    const keyId = state.key.split("-")[1] || "";
    const me = await api("/keys/" + encodeURIComponent(keyId));
    const select = $("tenant");
    select.replaceChildren();
    if (me.role === "platform_admin") {
      const tenants = (await api("/tenants")).data.filter((t) => t.tenant_id !== "platform");
      for (const t of tenants) select.add(new Option(`${t.name} (${t.tenant_id})`, t.tenant_id));
      select.disabled = false;
    } else {
      const own = await api("/tenants/" + encodeURIComponent(me.tenant_id));
      select.add(new Option(`${own.name} (${own.tenant_id})`, own.tenant_id));
      select.disabled = true;
    }
    $("who").textContent = `${me.role.replace("_", " ")} key ${me.hint ? "…" + me.hint : keyId}`;
    $("login").hidden = true;
    $("controls").hidden = false;
    $("forget").hidden = false;
  }

  function forget() {
    sessionStorage.removeItem(KEY_STORE);
    state.key = "";
    location.hash = "";
    location.reload();
  }

  // --- the range, in the URL's fragment so a view can be shared (never the key)

  const toInput = (s) => new Date(s * 1000).toISOString().slice(0, 16);
  const fromInput = (value) => Math.floor(Date.parse(value + ":00Z") / 1000);

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    // A select keeps its choice unless the link names one of its options.
    const pick = (id, name) => {
      const el = $(id), value = params.get(name);
      if (value === null) return;
      if (el.tagName !== "SELECT" || [...el.options].some((o) => o.value === value)) el.value = value;
    };
    pick("tenant", "tenant"); pick("range", "range");
    // The model list comes with the data: chosen then.
    state.linkedModel = params.get("model") || "";
    pick("from", "from"); pick("to", "to");
  }

  function writeHash(view) {
    const params = new URLSearchParams({ tenant: view.tenant, range: $("range").value });
    if (view.model) params.set("model", view.model);
    if ($("range").value === "custom") { params.set("from", $("from").value); params.set("to", $("to").value); }
    history.replaceState(null, "", "#" + params);
  }

  function currentView() {
    const preset = $("range").value;
    let fromS, toS;
    if (preset === "custom") {
      fromS = fromInput($("from").value);
      toS = fromInput($("to").value);
      if (!(fromS < toS)) throw new ApiError(400, "Choose a `from` before `to`.");
    } else {
      toS = Math.floor(Date.now() / 1000);
      fromS = toS - RANGE_S[preset];
      $("from").value = toInput(fromS);
      $("to").value = toInput(toS);
    }
    const [grain, stepS] = GRAINS.find(([, , upToS]) => toS - fromS <= upToS);
    // Whole buckets at both ends.
    fromS = Math.floor(fromS / stepS) * stepS;
    toS = Math.ceil(toS / stepS) * stepS;
    return { tenant: $("tenant").value, model: $("model").value, fromS, toS, grain, stepS };
  }

  // --- data ----------------------------------------------------------------

  async function load(view) {
    const query = (groups) => "/usage?" + new URLSearchParams({
      tenant_id: view.tenant, from: String(view.fromS), to: String(view.toS), group_by: groups,
    });
    const [series, totals] = await Promise.all([
      api(query(view.grain + ",model")), api(query("model"))]);
    return { rows: series.rows, totals: totals.rows };
  }

  function modelsOf(rows) {
    return [...new Set(rows.map((r) => r.model))].sort();
  }

  function refreshModels(models, chosen) {
    const select = $("model");
    select.replaceChildren(new Option("All models", ""));
    for (const m of models) select.add(new Option(m, m));
    select.value = models.includes(chosen) ? chosen : "";
    return select.value;
  }

  // x: every bucket start of the range; per model, its row of each bucket.
  function grid(view, rows, models) {
    const xs = [];
    for (let s = view.fromS; s < view.toS; s += view.stepS) xs.push(s);
    const index = new Map(xs.map((s, i) => [s, i]));
    const byModel = new Map(models.map((m) => [m, new Array(xs.length).fill(null)]));
    for (const r of rows) {
      const i = index.get(Date.parse(r[view.grain]) / 1000);
      if (i !== undefined && byModel.has(r.model)) byModel.get(r.model)[i] = r;
    }
    return { xs, byModel };
  }

  const count = (field) => (r) => (r ? r[field] : 0);
  const hitRatePct = (r) => (r && r.prompt_tokens ? 100 * r.cached_tokens / r.prompt_tokens : null);

  function chartSpecs(g, models) {
    const perModel = (pick, dash) => models.map((m, i) => ({
      label: m, color: COLORS[i % COLORS.length], dash, values: g.byModel.get(m).map(pick) }));
    const summed = (field) => g.xs.map((_, i) => models.reduce(
      (sum, m) => sum + count(field)(g.byModel.get(m)[i]), 0));
    // Quantiles cover answered requests only: a bucket of errors has none.
    const latency = (field) => (r) => (r && r.requests > r.errors ? r[field] : null);
    return {
      requests: perModel(count("requests")),
      tokens: [
        { label: "input", color: COLORS[0], values: summed("prompt_tokens") },
        { label: "cached input", color: COLORS[2], values: summed("cached_tokens") },
        { label: "output", color: COLORS[1], values: summed("completion_tokens") },
      ],
      cost: perModel((r) => (r ? r.cost_nusd / NUSD_PER_USD : 0)),
      ttft: models.flatMap((m, i) => [
        { label: m + " p50", color: COLORS[i % COLORS.length],
          values: g.byModel.get(m).map(latency("ttft_p50_ms")) },
        { label: m + " p99", color: COLORS[i % COLORS.length], dash: [6, 4],
          values: g.byModel.get(m).map(latency("ttft_p99_ms")) },
      ]),
      cache: perModel(hitRatePct),
      errors: perModel(count("errors")),
    };
  }

  // --- drawing ---------------------------------------------------------------

  function draw(name, xs, series) {
    const figure = $("chart-" + name);
    const opts = {
      width: Math.max(300, figure.clientWidth - 16),
      height: 220,
      tzDate: (s) => uPlot.tzDate(new Date(s * 1000), "Etc/UTC"),
      cursor: { sync: { key: "usage" } },
      scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] } },
      axes: [{}, { size: 56, values: (u, ticks) => ticks.map(compact) }],
      series: [{ label: "time (UTC)" }, ...series.map((s) => ({
        label: s.label, stroke: s.color, width: 2, dash: s.dash, spanGaps: false,
        // Isolated values between gaps would draw nothing without a point.
        points: { show: xs.length <= 60 || s.values.includes(null), size: 4 } }))],
    };
    const chart = new uPlot(opts, [xs, ...series.map((s) => s.values)], figure);
    state.charts.push(chart);
    return {
      series: series.map((s) => ({
        label: s.label,
        color: s.color,
        points: s.values.filter((v) => v !== null).length,
        sum: s.values.reduce((a, v) => a + (v || 0), 0),
      })),
    };
  }

  const compact = (v) => (Math.abs(v) >= 1e6 ? +(v / 1e6).toFixed(1) + "M"
    : Math.abs(v) >= 1e4 ? +(v / 1e3).toFixed(1) + "k" : +v.toPrecision(3) + "");
  const usd = (nusd) => "$" + (nusd / NUSD_PER_USD).toFixed(4);
  const int = (n) => n.toLocaleString("en-US");

  function fillTotals(totals, models) {
    const body = $("totals").tBodies[0];
    body.replaceChildren();
    for (const m of models) {
      const r = totals.find((t) => t.model === m);
      if (!r) continue;
      const row = body.insertRow();
      const cells = [m, int(r.requests), int(r.errors), int(r.prompt_tokens), int(r.cached_tokens),
        int(r.completion_tokens), usd(r.cost_nusd),
        `${r.ttft_p50_ms.toFixed(0)} / ${r.ttft_p99_ms.toFixed(0)}`,
        (100 * r.cache_hit_rate).toFixed(1) + " %"];
      for (const text of cells) row.insertCell().textContent = text;
    }
  }

  async function refresh() {
    const view = currentView();
    show("loading", "Loading…");
    writeHash(view);
    // Only the latest of overlapping refreshes draws.
    const seq = ++state.seq;
    const data = await load(view);
    if (seq !== state.seq) return;
    const all = modelsOf(data.totals);
    view.model = refreshModels(all, view.model || state.linkedModel);
    state.linkedModel = "";
    const models = view.model ? [view.model] : all;
    for (const chart of state.charts) chart.destroy();
    state.charts = [];
    $("report").hidden = false;
    const g = grid(view, data.rows, models);
    const specs = chartSpecs(g, models);
    const drawn = {};
    for (const [name, series] of Object.entries(specs)) drawn[name] = draw(name, g.xs, series);
    fillTotals(data.totals, models);
    $("grain").textContent = `one point per ${view.grain}, ${g.xs.length} points`;
    window.switchyardDashboard = {
      tenant_id: view.tenant, model: view.model, from_s: view.fromS, to_s: view.toS,
      grain: view.grain, buckets: g.xs.length, rows: data.rows.length, models,
      totals: data.totals.filter((r) => models.includes(r.model)), charts: drawn,
    };
    show("ready", data.rows.length ? `${int(data.rows.length)} rows, ${models.length} model(s).`
      : "No usage in this range.");
  }

  // --- wiring ----------------------------------------------------------------

  function signedOut() {
    sessionStorage.removeItem(KEY_STORE);
    state.key = "";
    $("login").hidden = false;
    $("controls").hidden = true;
  }

  function failed(err) {
    if (err instanceof ApiError && err.status === 401) signedOut();
    show("error", err instanceof ApiError ? `${err.status}: ${err.message}` : String(err));
  }

  async function start() {
    try {
      await signIn();
    } catch (err) {
      // A key that cannot even read itself (a user key, a typo) is not kept.
      signedOut();
      throw err;
    }
    readHash();
    await refresh();
  }

  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("key").value.trim();
    $("key").value = "";
    sessionStorage.setItem(KEY_STORE, state.key);
    start().catch(failed);
  });
  $("controls").addEventListener("submit", (ev) => { ev.preventDefault(); refresh().catch(failed); });
  $("range").addEventListener("change", () => { if ($("range").value !== "custom") refresh().catch(failed); });
  for (const id of ["tenant", "model"]) $(id).addEventListener("change", () => refresh().catch(failed));
  for (const id of ["from", "to"]) $(id).addEventListener("change", () => { $("range").value = "custom"; });
  $("forget").addEventListener("click", forget);
  window.addEventListener("resize", () => {
    for (const chart of state.charts) {
      chart.setSize({ width: Math.max(300, chart.root.parentNode.clientWidth - 16), height: 220 });
    }
  });

  if (typeof uPlot !== "function") {
    show("error", "The charting library did not load (run `make deps` on the admin API's host).");
  } else if (state.key) {
    $("login").hidden = true;
    start().catch(failed);
  }
})();
