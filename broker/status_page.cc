// The broker's status page: static HTML and JavaScript, no build step. It polls /api/status.
#include "broker/http_server.h"

namespace asrf {

const char kStatusPageHtml[] = R"asrfhtml(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ASR Fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2430; background: #f7f8fa; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  h2 { font-size: 15px; margin: 24px 0 8px; }
  .muted { color: #6b7585; }
  .tiles { display: flex; flex-wrap: wrap; gap: 12px; }
  .tile { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 10px 14px; min-width: 110px; }
  .tile .v { font-size: 22px; font-weight: 600; }
  .tile .k { color: #6b7585; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
  .bad .v { color: #b3261e; }
  canvas { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; }
  table { border-collapse: collapse; background: #fff; border: 1px solid #dde1e7; }
  th, td { padding: 6px 10px; border-bottom: 1px solid #eef0f3; text-align: left; vertical-align: top; }
  th { font-size: 12px; color: #6b7585; font-weight: 600; }
  .charts { display: flex; flex-wrap: wrap; gap: 16px; }
  #error { color: #b3261e; }
</style>
</head>
<body>
<h1>ASR Fleet</h1>
<div class="muted">Broker status, refreshed every 2 seconds. <span id="updated"></span> <span id="error"></span></div>

<h2>Jobs</h2>
<div class="tiles">
  <div class="tile"><div class="k">queued</div><div class="v" id="count-queued">–</div></div>
  <div class="tile"><div class="k">leased</div><div class="v" id="count-leased">–</div></div>
  <div class="tile"><div class="k">done</div><div class="v" id="count-done">–</div></div>
  <div class="tile"><div class="k">failed</div><div class="v" id="count-failed">–</div></div>
  <div class="tile bad"><div class="k">dead</div><div class="v" id="count-dead">–</div></div>
  <div class="tile"><div class="k">cancelled</div><div class="v" id="count-cancelled">–</div></div>
  <div class="tile"><div class="k">jobs / s</div><div class="v" id="jobs-per-s">–</div></div>
  <div class="tile"><div class="k">oldest queued</div><div class="v" id="oldest">–</div></div>
  <div class="tile"><div class="k">PostgreSQL</div><div class="v" id="pg">–</div></div>
</div>

<h2>Recent minutes</h2>
<div class="charts">
  <div><div class="muted">queue depth (queued, leased)</div><canvas id="depth" width="460" height="160"></canvas></div>
  <div><div class="muted">throughput (jobs / s)</div><canvas id="rate" width="460" height="160"></canvas></div>
</div>

<h2>Workers (<span id="worker-count">0</span>)</h2>
<table id="workers"><thead><tr><th>worker</th><th>device</th><th>slots</th><th>running</th><th>current jobs</th><th>outbox</th><th>state</th></tr></thead><tbody></tbody></table>

<h2>Recent failures</h2>
<table id="failures"><thead><tr><th>job</th><th>kind</th><th>state</th><th>reason</th><th>when</th></tr></thead><tbody></tbody></table>

<script>
"use strict";
const STATES = ["queued", "leased", "done", "failed", "dead", "cancelled"];
function text(id, v) { document.getElementById(id).textContent = v; }
function esc(s) { return String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c])); }
function ago(ms) { const s = Math.max(0, (Date.now() - ms) / 1000); return s < 90 ? s.toFixed(0) + " s ago" : (s / 60).toFixed(0) + " min ago"; }
function chart(id, series, colors) {
  const c = document.getElementById(id), g = c.getContext("2d"), W = c.width, H = c.height, P = 28;
  g.clearRect(0, 0, W, H);
  let max = 1, n = 0;
  for (const s of series) { n = Math.max(n, s.length); for (const v of s) max = Math.max(max, v); }
  g.strokeStyle = "#dde1e7"; g.fillStyle = "#6b7585"; g.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) { const y = P / 2 + (H - P) * i / 4; g.beginPath(); g.moveTo(P, y); g.lineTo(W - 4, y); g.stroke();
    const v = max * (4 - i) / 4; g.fillText(max < 8 ? v.toFixed(1) : String(Math.round(v)), 2, y + 4); }
  series.forEach((s, k) => {
    g.strokeStyle = colors[k]; g.lineWidth = 2; g.beginPath();
    s.forEach((v, i) => { const x = P + (W - P - 4) * (n <= 1 ? 1 : i / (n - 1)), y = P / 2 + (H - P) * (1 - v / max);
      if (i) g.lineTo(x, y); else g.moveTo(x, y); });
    g.stroke();
  });
}
async function refresh() {
  try {
    const r = await fetch("/api/status", {cache: "no-store"});
    const s = await r.json();
    for (const k of STATES) text("count-" + k, s.counts[k]);
    text("jobs-per-s", s.jobs_per_s.toFixed(1));
    text("oldest", s.oldest_queued_s.toFixed(0) + " s");
    text("pg", s.pg_configured ? (s.pg_up ? "up" : "down (backlog " + s.event_backlog + ")") : "not configured");
    text("worker-count", s.workers.length);
    document.querySelector("#workers tbody").innerHTML = s.workers.map(w =>
      `<tr><td>${esc(w.id)}</td><td>${esc(w.device)}</td><td>${w.slots}</td><td class="running">${w.running}</td>` +
      `<td>${w.jobs.join(", ")}</td><td>${w.outbox_results}</td><td>${w.draining ? "draining" : "serving"}</td></tr>`).join("");
    document.querySelector("#failures tbody").innerHTML = s.recent_failures.map(f =>
      `<tr><td>${f.id}</td><td>${esc(f.kind)}</td><td>${esc(f.state)}</td><td>${esc(f.error)}</td><td>${ago(f.finished_ms)}</td></tr>`).join("");
    chart("depth", [s.history.map(p => p.queued), s.history.map(p => p.leased)], ["#2f6fde", "#e08a1e"]);
    chart("rate", [s.history.map(p => p.jobs_per_s)], ["#1f9d55"]);
    text("updated", "Updated " + new Date(s.taken_ms).toLocaleTimeString() + ".");
    text("error", "");
    document.body.dataset.loaded = "1";
  } catch (e) {
    text("error", "Cannot reach the broker: " + e);
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
)asrfhtml";

}  // namespace asrf
