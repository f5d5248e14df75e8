// drover's live page: operations and their VMs, updated from the status
// stream (server-sent events). Plain JavaScript, no build step.
"use strict";

const params = new URLSearchParams(location.search);
if (params.get("token")) sessionStorage.setItem("drover-token", params.get("token"));
const token = sessionStorage.getItem("drover-token");
const withToken = (path) => token ? path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : path;

const ops = new Map();      // key -> {rec, vms: Map(target -> progress), open}
const phaseOfState = {pending: "Pending", running: "Running", waiting: "Waiting", suspended: "Suspended",
  succeeded: "Succeeded", failed: "Failed", cancelled: "Cancelled"};
const finished = (phase) => phase === "Succeeded" || phase === "Failed" || phase === "Cancelled";
let donePhases = ["Running", "Succeeded"]; // replaced from api/phases at start
const isDone = (phase) => donePhases.includes(phase);

async function getJSON(path) {
  const r = await fetch(withToken(path));
  if (!r.ok) throw new Error(path + ": " + r.status + " " + (await r.text()));
  return r.json();
}

function op(key) {
  let o = ops.get(key);
  if (!o) { o = {rec: {key: key}, vms: new Map(), open: false}; ops.set(key, o); }
  return o;
}

async function loadOperation(key) {
  const d = await getJSON("api/operations/" + encodeURIComponent(key));
  const o = op(key);
  o.rec = d;
  for (const [t, p] of Object.entries(d.targets || {})) o.vms.set(t, p);
}

async function loadAll() {
  donePhases = (await getJSON("api/phases")).done;
  const recs = await getJSON("api/operations");
  for (const rec of recs) {
    const o = op(rec.key);
    o.rec = rec;
    if (!finished(phaseOfState[rec.state]) && rec.summary) { o.open = true; await loadOperation(rec.key); }
  }
  render();
  loadDeadLetters();
}

async function loadDeadLetters() {
  const dls = await getJSON("api/deadletters");
  const body = document.querySelector("#deadletters tbody");
  body.replaceChildren(...dls.map((d) => row([d.seq, time(d.time), d.workflow, d.target || "", d.operation || "", d.reason])));
  document.getElementById("no-deadletters").hidden = dls.length > 0;
}

function onStatus(ev) {
  const st = JSON.parse(ev.data);
  const o = op(st.operation);
  const known = !!o.rec.workflow;
  o.rec.workflow = st.workflow;
  o.rec.target = st.vm && st.workflow === "migration" ? st.vm : (st.node || st.vm);
  o.phase = st.phase;
  if (st.message) o.rec.message = st.message;
  if (st.summary) o.rec.summary = st.summary.phases || {};
  if (!o.rec.started) o.rec.started = st.time;
  if (finished(st.phase)) o.rec.finished = st.time;
  for (const vm of st.vms || []) {
    o.vms.set(vm.namespace + "/" + vm.name, {phase: vm.phase, node: vm.node, message: vm.message, updated: st.time});
    o.open = true;
  }
  if (!known) loadOperation(st.operation).then(render).catch(() => {});
  render();
  if (st.phase === "Failed") loadDeadLetters().catch(() => {});
}

function phaseOf(o) { return o.phase || phaseOfState[o.rec.state] || "Pending"; }

function counts(o) {
  const s = o.rec.summary || {};
  let total = 0, done = 0;
  for (const [phase, n] of Object.entries(s)) {
    total += n;
    if (isDone(phase)) done += n;
  }
  if (o.vms.size > total) { total = o.vms.size; done = [...o.vms.values()].filter((p) => isDone(p.phase)).length; }
  return total ? done + "/" + total : "";
}

function time(t) { return t ? new Date(t).toLocaleTimeString() : ""; }

function took(o) {
  if (!o.rec.started) return "";
  const end = o.rec.finished && !String(o.rec.finished).startsWith("0001") ? new Date(o.rec.finished) : new Date();
  const s = Math.max(0, Math.round((end - new Date(o.rec.started)) / 1000));
  return s < 120 ? s + "s" : Math.round(s / 60) + "m";
}

function cell(text, cls, phase) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  if (phase) td.dataset.phase = phase;
  return td;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(cell(c));
  return tr;
}

function render() {
  const body = document.querySelector("#operations tbody");
  const sorted = [...ops.values()].sort((a, b) => {
    const fa = finished(phaseOf(a)), fb = finished(phaseOf(b));
    if (fa !== fb) return fa ? 1 : -1;
    return String(b.rec.created || b.rec.started || "").localeCompare(String(a.rec.created || a.rec.started || ""));
  });
  const rows = [];
  for (const o of sorted) {
    const tr = document.createElement("tr");
    tr.className = "op";
    tr.dataset.op = o.rec.key;
    const phase = phaseOf(o);
    tr.append(cell(o.rec.key), cell(o.rec.workflow), cell(o.rec.target), cell(phase, "phase", phase),
      cell(counts(o)), cell(time(o.rec.started)), cell(took(o)), cell(o.rec.waitReason || o.rec.lastError || o.rec.message));
    tr.onclick = () => { o.open = !o.open; if (o.open) loadOperation(o.rec.key).then(render); else render(); };
    rows.push(tr);
    if (!o.open) continue;
    for (const [t, p] of [...o.vms.entries()].sort()) {
      const vr = document.createElement("tr");
      vr.className = "vm";
      vr.dataset.vm = t;
      vr.dataset.op = o.rec.key;
      vr.append(cell(t), cell(""), cell(p.node ? "on " + p.node : ""), cell(p.phase, "phase", p.phase), cell(""),
        cell(time(p.updated)), cell(""), cell(p.message));
      rows.push(vr);
    }
  }
  body.replaceChildren(...rows);
  document.getElementById("no-operations").hidden = ops.size > 0;
}

function connect() {
  const es = new EventSource(withToken("api/events"));
  const state = document.getElementById("connection");
  es.onopen = () => { state.className = "on"; state.textContent = "live"; };
  es.onerror = () => { state.className = "off"; state.textContent = "reconnecting…"; };
  es.addEventListener("status", onStatus);
}

connect();
loadAll().catch((e) => { document.getElementById("connection").textContent = String(e); });
setInterval(() => { render(); loadDeadLetters().catch(() => {}); }, 30000);
