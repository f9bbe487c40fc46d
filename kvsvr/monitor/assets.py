"""The monitor page's style and scripts, inlined into every page (no CDN, no third-party code).

COMMON_SCRIPT runs on every page: it writes each `<time data-t="UNIX">` in the browser's local
time zone, says which zone that is, and runs the auto-refresh of the ids and alerts pages
(`data-refresh-part`: the page fetches itself with ?part=main and swaps its main element;
the "auto-refresh" box pauses it). CHART_SCRIPT draws an id's curves from /api/chart: SVG
with axes (values with the unit, local date and time with the zone), one line per machine
with a legend, hover values, a range picker and auto-refresh.
"""

from __future__ import annotations

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2a44;color:#fff;padding:.6em 1.5em;display:flex;gap:1.5em;
 align-items:center;flex-wrap:wrap}
header a{color:#fff;text-decoration:none;font-weight:600}header .grow{flex:1}
header label,header .muted{color:#c9d3e6;font-size:.9em}
main{padding:1em 1.5em}h1{font-size:1.4em;margin:.2em 0 .6em}
table{border-collapse:collapse;background:#fff}
td,th{padding:5px 10px;border-bottom:1px solid #e6e8ec;text-align:left;vertical-align:middle}
th{font-size:.85em;color:#555;background:#eef0f4}td.num{text-align:right;
 font-variant-numeric:tabular-nums}
tr.novalue td{color:#8a8f99}
.firing{background:#fde0e0;color:#8b0000;font-weight:bold}
.alerts{border:2px solid #c62828;background:#fff5f5;padding:.5em 1em;margin-bottom:1em}
.status{padding:.6em 1em;margin-bottom:1em;border-radius:4px}
.status.ok{background:#e8f5e9;color:#1b5e20}
.status.norules{background:#fff8e1;color:#6d4c00;border:1px solid #e0b000}
.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:.6em .8em;
 margin-bottom:1em;position:relative}
.card h2{font-size:1.05em;margin:.1em 0 .4em}
.picker button{border:1px solid #9aa5b8;background:#fff;padding:.25em .7em;cursor:pointer;
 margin-right:.3em;border-radius:3px}
.picker button.active{background:#1d2a44;color:#fff;border-color:#1d2a44}
.legend{display:flex;flex-wrap:wrap;gap:.4em 1.2em;font-size:.9em;margin-top:.2em}
.legend .swatch{display:inline-block;width:14px;height:4px;margin-right:5px;
 vertical-align:middle;border-radius:2px}
.tooltip{position:absolute;pointer-events:none;background:rgba(29,42,68,.95);color:#fff;
 font-size:12px;padding:6px 8px;border-radius:4px;white-space:nowrap;display:none;z-index:5}
.tooltip .swatch{display:inline-block;width:10px;height:10px;margin-right:4px;
 border-radius:2px;vertical-align:middle}
.note{color:#666;font-size:.9em}.error{color:#b71c1c;font-weight:bold}
svg text{font-family:system-ui,sans-serif}
"""

COMMON_SCRIPT = r"""
const KV = {};
KV.pad = (n) => String(n).padStart(2, "0");
KV.zone = () => {
  const name = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
  const offset = -new Date().getTimezoneOffset(), a = Math.abs(offset);
  return name + " (UTC" + (offset >= 0 ? "+" : "-") + KV.pad(Math.floor(a / 60)) + ":" +
    KV.pad(a % 60) + ")";
};
KV.date = (t) => { const d = new Date(t * 1000);
  return d.getFullYear() + "-" + KV.pad(d.getMonth() + 1) + "-" + KV.pad(d.getDate()); };
KV.time = (t, seconds) => { const d = new Date(t * 1000);
  return KV.pad(d.getHours()) + ":" + KV.pad(d.getMinutes()) +
    (seconds ? ":" + KV.pad(d.getSeconds()) : ""); };
KV.dateTime = (t) => KV.date(t) + " " + KV.time(t, true);
KV.times = (root) => {
  for (const el of root.querySelectorAll("time[data-t]")) {
    el.textContent = KV.dateTime(Number(el.dataset.t));
    el.title = KV.zone();
  }
  for (const el of document.querySelectorAll(".zone")) el.textContent = KV.zone();
};
KV.refreshing = () => { const box = document.getElementById("autorefresh");
  return !box || box.checked; };
KV.stamp = () => { const el = document.getElementById("updated");
  if (el) el.textContent = "updated " + KV.time(Date.now() / 1000, true); };
document.addEventListener("DOMContentLoaded", () => {
  KV.times(document); KV.stamp();
  const main = document.querySelector("main[data-refresh-part]");
  if (!main) return;
  const every = Number(main.dataset.refreshS) * 1000;
  let refreshes = 0;
  setInterval(async () => {
    if (!KV.refreshing()) return;
    const url = new URL(location.href); url.searchParams.set("part", "main");
    try {
      const answer = await fetch(url);
      if (!answer.ok) return;
      main.innerHTML = await answer.text();
      KV.times(main); KV.stamp();
      main.dataset.refreshes = String(++refreshes);
    } catch (e) { /* the center is restarting: try again at the next tick */ }
  }, every);
});
"""

CHART_SCRIPT = r"""
KV.COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
             "#17becf", "#7f7f7f", "#bcbd22"];
KV.TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
                 21600, 43200, 86400];
KV.number = (v) => {
  if (v === null || v === undefined) return "no data";
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(a >= 1e10 ? 0 : 1) + "G";
  if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(a >= 1e5 ? 0 : 1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(a >= 10 ? 1 : 2);
};
KV.withUnit = (v, unit) => v === null ? "no data" : KV.number(v) + " " + KV.escape(unit);
KV.niceStep = (span, count) => {
  const raw = span / count, power = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (m * power >= raw) return m * power;
  return 10 * power;
};
KV.escape = (s) => String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");

// One chart: series [{name, color, values}] of points `step` seconds apart from `first`.
KV.chart = (card, spec) => {
  const W = Math.max(card.clientWidth - 20, 480), H = 300;
  const L = 74, R = 18, T = 14, B = 58, PW = W - L - R, PH = H - T - B;
  const n = Math.max(...spec.series.map((s) => s.values.length), 1);
  const last = spec.first + (n - 1) * spec.step;
  const present = spec.series.flatMap((s) => s.values.filter((v) => v !== null));
  let lo = Math.min(0, ...present), hi = Math.max(...present, lo + 1);
  if (hi === lo) hi = lo + 1;
  const yStep = KV.niceStep(hi - lo, 5);
  lo = Math.floor(lo / yStep) * yStep; hi = Math.ceil(hi / yStep) * yStep;
  const x = (i) => L + (n > 1 ? (i / (n - 1)) * PW : PW / 2);
  const y = (v) => T + PH - ((v - lo) / (hi - lo)) * PH;
  const out = [];
  out.push(`<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}"` +
           ` role="img" aria-label="${KV.escape(spec.title)}">`);
  out.push(`<rect x="${L}" y="${T}" width="${PW}" height="${PH}" fill="#fff"/>`);
  for (let v = lo; v <= hi + yStep / 2; v += yStep) {
    out.push(`<line x1="${L}" x2="${L + PW}" y1="${y(v)}" y2="${y(v)}" stroke="#e3e6eb"/>`);
    out.push(`<text class="ytick" x="${L - 6}" y="${y(v) + 4}" font-size="11"` +
             ` text-anchor="end">${KV.number(v)}</text>`);
  }
  out.push(`<text class="yaxis" font-size="12" text-anchor="middle" fill="#333"` +
           ` transform="translate(14,${T + PH / 2}) rotate(-90)">` +
           `${KV.escape(spec.unitLabel)}</text>`);
  const span = Math.max(last - spec.first, 1);
  const tStep = KV.TIME_STEPS.find((s) => span / s <= 7) || 86400;
  const zoneShift = -new Date(spec.first * 1000).getTimezoneOffset() * 60;
  let previousDay = null;
  for (let t = Math.ceil((spec.first + zoneShift) / tStep) * tStep - zoneShift; t <= last;
       t += tStep) {
    const px = L + ((t - spec.first) / span) * PW, day = KV.date(t);
    out.push(`<line x1="${px}" x2="${px}" y1="${T}" y2="${T + PH}" stroke="#f0f1f4"/>`);
    out.push(`<line x1="${px}" x2="${px}" y1="${T + PH}" y2="${T + PH + 4}" stroke="#555"/>`);
    out.push(`<text class="xtick" x="${px}" y="${T + PH + 16}" font-size="11"` +
             ` text-anchor="middle">${KV.time(t, tStep < 60)}</text>`);
    if (day !== previousDay) {
      out.push(`<text class="xdate" x="${px}" y="${T + PH + 29}" font-size="10"` +
               ` text-anchor="middle" fill="#555">${day}</text>`);
      previousDay = day;
    }
  }
  out.push(`<line x1="${L}" x2="${L + PW}" y1="${T + PH}" y2="${T + PH}" stroke="#555"/>`);
  out.push(`<line x1="${L}" x2="${L}" y1="${T}" y2="${T + PH}" stroke="#555"/>`);
  out.push(`<text class="xaxis" x="${L + PW / 2}" y="${H - 6}" font-size="12"` +
           ` text-anchor="middle" fill="#333">Local time: ${KV.escape(KV.zone())}</text>`);
  for (const [g0, g1] of spec.gaps) {
    const a = Math.max(g0, spec.first), b = Math.min(g1, last);
    if (a > b) continue;
    const px = L + ((a - spec.first) / span) * PW;
    out.push(`<rect class="gap" x="${px}" y="${T}" height="${PH}" fill="#e9e9e9"` +
             ` width="${Math.max(((b - a) / span) * PW, 2)}"><title>seconds lost: ` +
             `${KV.dateTime(g0)} to ${KV.dateTime(g1)}</title></rect>`);
  }
  for (const s of spec.series) {
    let run = [];
    const flush = () => {
      if (run.length === 1) {
        out.push(`<circle class="point" cx="${run[0][0]}" cy="${run[0][1]}" r="2.5"` +
                 ` fill="${s.color}"/>`);
      } else if (run.length > 1) {
        out.push(`<polyline class="line" data-series="${KV.escape(s.name)}" fill="none"` +
                 ` stroke="${s.color}" stroke-width="1.6" points="` +
                 run.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" ") + `"/>`);
      }
      run = [];
    };
    s.values.forEach((v, i) => { if (v === null) flush(); else run.push([x(i), y(v)]); });
    flush();
  }
  if (!present.length) {
    out.push(`<text x="${L + PW / 2}" y="${T + PH / 2}" font-size="13" text-anchor="middle"` +
             ` fill="#888">no data in this range</text>`);
  }
  out.push(`<line class="cursor" x1="0" x2="0" y1="${T}" y2="${T + PH}" stroke="#333"` +
           ` stroke-dasharray="3,3" visibility="hidden"/>`);
  out.push(`<rect class="hover" x="${L}" y="${T}" width="${PW}" height="${PH}"` +
           ` fill="transparent"/></svg>`);
  const legend = spec.series.map((s) => {
    const latest = [...s.values].reverse().find((v) => v !== null);
    return `<span class="entry" data-series="${KV.escape(s.name)}"><span class="swatch"` +
      ` style="background:${s.color}"></span>${KV.escape(s.name)}: ` +
      KV.withUnit(latest === undefined ? null : latest, spec.unitLabel) + "</span>";
  }).join("");
  card.querySelector(".plot").innerHTML = out.join("");
  card.querySelector(".legend").innerHTML = legend;
  const svg = card.querySelector("svg"), cursor = svg.querySelector(".cursor");
  const tip = card.querySelector(".tooltip");
  svg.querySelector(".hover").addEventListener("mousemove", (event) => {
    const box = svg.getBoundingClientRect(), px = event.clientX - box.left;
    const i = Math.max(0, Math.min(n - 1, Math.round(((px - L) / PW) * (n - 1))));
    cursor.setAttribute("x1", x(i)); cursor.setAttribute("x2", x(i));
    cursor.setAttribute("visibility", "visible");
    const t = spec.first + i * spec.step;
    tip.innerHTML = `<b>${KV.dateTime(t)}</b>` +
      (spec.step > 1 ? ` (max of ${spec.step} s)` : "") +
      spec.series.map((s) => `<br><span class="swatch" style="background:${s.color}"></span>` +
        `${KV.escape(s.name)}: ` + KV.withUnit(s.values[i] ?? null, spec.unitLabel))
        .join("");
    tip.style.display = "block";
    tip.style.left = Math.min(x(i) + 12, W - 220) + "px"; tip.style.top = (T + 30) + "px";
  });
  svg.querySelector(".hover").addEventListener("mouseleave", () => {
    tip.style.display = "none"; cursor.setAttribute("visibility", "hidden"); });
};

KV.curvePage = () => {
  const cfg = JSON.parse(document.getElementById("chart-config").textContent);
  const state = {range: cfg.range, end: cfg.end, fetches: 0};
  const body = document.body;
  const mark = () => {
    let chosen = false;
    for (const b of document.querySelectorAll(".picker button[data-range]")) {
      b.classList.toggle("active", Number(b.dataset.range) === state.range);
      chosen = chosen || Number(b.dataset.range) === state.range;
    }
    document.getElementById("custom-range").textContent = chosen ? "" :
      `(${state.range} s) `;
    const url = new URL(location.href);
    url.searchParams.set("range", state.range);
    if (state.end) url.searchParams.set("end", state.end); else url.searchParams.delete("end");
    history.replaceState(null, "", url);
  };
  const load = async () => {
    const q = `/api/chart?id=${cfg.id}&range=${state.range}` +
      (state.end ? `&end=${state.end}` : "");
    let data;
    try {
      const answer = await fetch(q);
      if (!answer.ok) throw new Error(await answer.text());
      data = await answer.json();
    } catch (e) {
      document.getElementById("chart-error").textContent = "Could not load the curve: " + e.message;
      return;
    }
    document.getElementById("chart-error").textContent = "";
    state.fetches += 1;
    body.dataset.fetches = String(state.fetches);
    body.dataset.first = String(data.first_second);
    body.dataset.last = String(data.last_second);
    body.dataset.range = String(data.last_second - data.first_second + 1);
    const note = data.step > 1 ? ` — each point is the maximum of ${data.step} s` : "";
    document.getElementById("span").innerHTML = `${KV.dateTime(data.first_second)} to ` +
      `${KV.dateTime(data.last_second)} <span class="zone"></span>${note}`;
    KV.chart(document.getElementById("sum"), {title: data.name + " (sum)", first: data.first_second,
      step: data.step, unitLabel: data.unit_label, gaps: data.gaps,
      series: [{name: "sum of all machines", color: data.firing ? "#c62828" : "#1d2a44",
                values: data.sum}]});
    const names = Object.keys(data.machines);
    KV.chart(document.getElementById("machines"), {title: data.name + " per machine",
      first: data.first_second, step: data.step, unitLabel: data.unit_label, gaps: [],
      series: names.map((m, i) => ({name: m, color: KV.COLORS[i % KV.COLORS.length],
                                    values: data.machines[m]}))});
    KV.times(document); KV.stamp();
  };
  for (const b of document.querySelectorAll(".picker button[data-range]")) {
    b.addEventListener("click", () => { state.range = Number(b.dataset.range); mark(); load(); });
  }
  document.getElementById("earlier").addEventListener("click", () => {
    state.end = Number(body.dataset.first) - 1; mark(); load(); });
  document.getElementById("newest").addEventListener("click", () => {
    state.end = null; mark(); load(); });
  // Auto-refresh follows the newest data; a view of the past (end=) stays put.
  setInterval(() => { if (KV.refreshing() && !state.end) load(); }, cfg.refresh_s * 1000);
  window.addEventListener("resize", () => load());
  mark(); load();
};
"""

__all__ = ["CHART_SCRIPT", "COMMON_SCRIPT", "STYLE"]
