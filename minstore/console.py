"""
The HTML console served at ``GET /`` to a browser: the cluster as this node
sees it (``/_node/status``: its peers' state, backlog, lag and last error;
a cache front's dependants), and the records of each collection, to browse,
create, edit and delete.  One static page: it talks to the same JSON API as
any client, so it needs no route of its own.

The URL's hash is the page's state, so a view can be bookmarked or sent:
``#/books`` opens a collection, ``#/books/dune`` a record in it (each part
percent-encoded).  Collections and records are links (Tab, Enter).  A save
or delete refused with 412 (the record changed since it was read) shows the
current version and offers to reload it or to overwrite it.  Each
collection keeps its own uid prefix filter, shown above its records.
"""

CONSOLE_HTML = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>minstore console</title>
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; }
 header { background: #243447; color: #fff; padding: .6em 1em; display: flex; flex-wrap: wrap; gap: .3em 1em; align-items: baseline; }
 header h1 { font-size: 1.2em; margin: 0; }
 header small { opacity: .85; word-break: break-all; }
 main { display: grid; grid-template-columns: minmax(10em, 14em) minmax(0, 1fr) minmax(16em, 26em); gap: 1em; padding: 1em; }
 section { border: 1px solid #ddd; border-radius: 4px; padding: .6em; overflow: auto; min-width: 0; }
 #cluster { grid-column: 1 / -1; }
 h2 { font-size: 1em; margin: 0 0 .5em; }
 ul { list-style: none; padding: 0; margin: 0; }
 a { color: #0b5cad; }
 li.active a { font-weight: bold; }
 a:focus-visible, button:focus-visible, input:focus-visible, textarea:focus-visible { outline: 2px solid #f5a623; outline-offset: 1px; }
 table { border-collapse: collapse; width: 100%; }
 td, th { text-align: left; padding: .25em .4em; border-bottom: 1px solid #eee; vertical-align: top; }
 td.value { font-family: monospace; max-width: 24em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
 td.mono, .mono { font-family: monospace; font-size: .85em; word-break: break-all; }
 tr.current { background: #eef4fb; }
 input, textarea { width: 100%; box-sizing: border-box; font: inherit; }
 textarea { font-family: monospace; min-height: 12em; }
 button { margin: .4em .3em 0 0; }
 #message { margin-top: .6em; white-space: pre-wrap; }
 .error { color: #b00020; } .ok { color: #1b7f3b; }
 .meta { font-family: monospace; font-size: .85em; color: #555; word-break: break-all; }
 .state-up { color: #1b7f3b; } .state-retrying { color: #a15c00; } .state-down { color: #b00020; }
 #conflict { border: 1px solid #b00020; border-radius: 4px; padding: .5em; margin-top: .6em; }
 #conflict pre { white-space: pre-wrap; word-break: break-all; max-height: 12em; overflow: auto; margin: .3em 0; }
 #filter { font-size: .9em; color: #555; }
 @media (max-width: 900px) {
  main { grid-template-columns: minmax(0, 1fr); padding: .5em; gap: .6em; }
  td.value { max-width: 12em; }
 }
</style>
</head>
<body>
<header><h1>minstore</h1><small id="node"></small></header>
<main>
 <section id="cluster" aria-labelledby="cluster-title">
  <h2 id="cluster-title">Cluster <button id="refresh" type="button">Refresh</button></h2>
  <div id="self" class="meta"></div>
  <table id="peers"><thead><tr><th scope="col">peer</th><th scope="col">state</th><th scope="col">backlog</th><th scope="col">lag (s)</th><th scope="col">last error</th></tr></thead><tbody></tbody></table>
  <p id="nopeers" hidden>No peers: a standalone node.</p>
  <div id="front" hidden><h2>Cache front: dependants</h2>
   <table id="dependants"><thead><tr><th scope="col">dependant</th><th scope="col">replicas waiting</th></tr></thead><tbody></tbody></table>
  </div>
  <div id="clustererror" class="error"></div>
 </section>
 <section aria-labelledby="collections-title">
  <h2 id="collections-title">Collections</h2>
  <ul id="collections"></ul>
  <p><label>open a collection <input id="newcollection" placeholder="name, then Enter"></label></p>
 </section>
 <section aria-labelledby="title">
  <h2 id="title">Records</h2>
  <p><label>uid prefix <input id="prefix" placeholder="any uid"></label></p>
  <div id="filter" hidden><span id="filtertext"></span> <button id="clearprefix" type="button">Clear filter</button></div>
  <table><thead><tr><th scope="col">uid</th><th scope="col">value</th><th scope="col">version</th><th scope="col">timestamp</th><th scope="col">lang</th></tr></thead><tbody id="records"></tbody></table>
  <button id="more" type="button" hidden>More</button>
 </section>
 <section aria-labelledby="record-title">
  <h2 id="record-title">Record</h2>
  <label>uid <input id="uid" placeholder="empty: generated on create"></label>
  <label>value (JSON) <textarea id="value">"hello world"</textarea></label>
  <div class="meta" id="meta"></div>
  <button id="create" type="button">Create</button><button id="save" type="button">Save</button><button id="delete" type="button">Delete</button><button id="clear" type="button">New</button>
  <div id="conflict" hidden role="alert">
   <strong>Changed since you read it.</strong> The current version is <span id="conflictversion" class="mono"></span>:
   <pre id="conflictvalue"></pre>
   <button id="reload" type="button">Reload it (drop my edit)</button><button id="overwrite" type="button">Overwrite it</button>
  </div>
  <div id="message" role="status"></div>
 </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let collection = null, cursor = null, current = null, conflict = null;
const prefixes = {};   // collection -> its uid prefix filter

function say(text, ok) { const m = $("message"); m.textContent = text; m.className = ok ? "ok" : "error"; }
function path(c, uid) { return "/" + encodeURIComponent(c) + "/" + (uid === undefined ? "" : encodeURIComponent(uid)); }
function link(c, uid) { return "#/" + encodeURIComponent(c) + (uid === undefined ? "" : "/" + encodeURIComponent(uid)); }
function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td; }
function when(seconds) { return seconds == null ? "" : new Date(seconds * 1000).toISOString().replace("T", " ").replace(/\\.\\d+Z$/, "Z"); }

class HTTPError extends Error {
  constructor(status, data) {
    super(status + " " + ((data && (data.error + ": " + data.message)) || ""));
    this.status = status; this.data = data;
  }
}

async function call(method, url, body, headers, retried) {
  const init = { method, headers: Object.assign({ "Accept": "application/json" }, headers || {}) };
  if (body !== undefined) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  // A node with --tokens answers 401: ask for a token, kept in this tab's
  // session storage only (gone when the tab closes).
  const token = sessionStorage.getItem("minstore-token");
  if (token) init.headers["Authorization"] = "Bearer " + token;
  const response = await fetch(url, init);
  if (response.status === 401 && !retried) {
    const entered = window.prompt("This node needs a token (Authorization: Bearer).", "");
    if (entered) {
      sessionStorage.setItem("minstore-token", entered.trim());
      return call(method, url, body, headers, true);
    }
  }
  const text = await response.text();
  let data = null; try { data = text ? JSON.parse(text) : null; } catch (e) { data = { message: text }; }
  if (!response.ok) throw new HTTPError(response.status, data);
  return data;
}

// -- the cluster ----------------------------------------------------------

async function loadCluster() {
  try {
    const s = await call("GET", "/_node/status");
    $("clustererror").textContent = "";
    $("self").textContent = "this node " + s.node_id + " \\u00b7 minstore " + s.version + " \\u00b7 " + s.records +
      " records \\u00b7 storage " + s.storage + " \\u00b7 up " + Math.round(s.uptime) + " s" +
      (s.security ? " \\u00b7 " + s.security.mode : "") + (s.servers && s.servers.bridge ? " \\u00b7 bridge" : "");
    const body = $("peers").tBodies[0]; body.replaceChildren();
    for (const p of s.peers || []) {
      const tr = document.createElement("tr");
      cell(tr, p.url, "mono"); cell(tr, p.state, "state-" + p.state); cell(tr, String(p.backlog));
      cell(tr, p.oldest_undelivered_age == null ? "0" : p.oldest_undelivered_age.toFixed(1));
      cell(tr, p.last_error || "", "mono");
      body.appendChild(tr);
    }
    $("peers").hidden = !(s.peers && s.peers.length); $("nopeers").hidden = !$("peers").hidden;
    const deps = (s.cache && s.cache.dependants) || [];
    const dbody = $("dependants").tBodies[0]; dbody.replaceChildren();
    for (const url of deps) {
      const tr = document.createElement("tr"); cell(tr, url, "mono");
      cell(tr, String((s.cache.replica_backlog || {})[url] || 0)); dbody.appendChild(tr);
    }
    $("front").hidden = deps.length === 0;
  } catch (e) { $("clustererror").textContent = "cluster status: " + e.message; }
}

// -- collections and records --------------------------------------------

async function loadNode() {
  const info = await call("GET", "/");
  $("node").textContent = "node " + info.node_id + " \\u00b7 version " + info.version;
  const list = $("collections"); list.replaceChildren();
  const names = info.collections.slice();
  if (collection && names.indexOf(collection) < 0) names.push(collection);
  for (const name of names) {
    const li = document.createElement("li"); const a = document.createElement("a");
    a.textContent = name; a.href = link(name);
    if (name === collection) { li.className = "active"; a.setAttribute("aria-current", "page"); }
    li.appendChild(a); list.appendChild(li);
  }
}

function showFilter() {
  const prefix = prefixes[collection] || "";
  $("prefix").value = prefix;
  $("filter").hidden = !prefix;
  $("filtertext").textContent = prefix ? "uids starting with \\u201c" + prefix + "\\u201d only" : "";
}

async function openCollection(name, more) {
  if (name !== collection) { collection = name; showFilter(); }
  $("title").textContent = "Records in " + name;
  if (!more) { cursor = null; $("records").replaceChildren(); }
  let url = path(name) + "?limit=50";
  if (cursor) url += "&after=" + encodeURIComponent(cursor);
  if (prefixes[name]) url += "&prefix=" + encodeURIComponent(prefixes[name]);
  try {
    const page = await call("GET", url);
    for (const record of page.items) {
      const tr = document.createElement("tr"); tr.dataset.uid = record.uid;
      const a = document.createElement("a"); a.href = link(name, record.uid); a.textContent = record.uid;
      cell(tr, "").appendChild(a);
      cell(tr, JSON.stringify(record.value), "value");
      cell(tr, record.version, "mono"); cell(tr, when(record.timestamp), "mono");
      cell(tr, record.lang == null ? "" : record.lang);
      if (current && current.uid === record.uid) tr.className = "current";
      $("records").appendChild(tr);
    }
    cursor = page.next; $("more").hidden = !cursor;
    await loadNode();
  } catch (e) { say(e.message); }
}

function show(record) {
  current = record; hideConflict();
  $("uid").value = record.uid;
  $("value").value = JSON.stringify(record.value, null, 2);
  const meta = Object.assign({}, record); delete meta.value;
  $("meta").textContent = JSON.stringify(meta);
  for (const tr of $("records").children) tr.className = tr.dataset.uid === record.uid ? "current" : "";
}

function blank() { current = null; hideConflict(); $("uid").value = ""; $("value").value = '""'; $("meta").textContent = ""; }

async function openRecord(name, uid) {
  try { show(await call("GET", path(name, uid))); }
  catch (e) { blank(); $("uid").value = uid; say(e.status === 404 ? "no record " + name + "/" + uid : e.message); }
}

// The hash is the state: #/collection or #/collection/uid.
async function route() {
  const parts = location.hash.replace(/^#\\/?/, "").split("/");
  if (!parts[0]) { await loadNode(); return; }
  const name = decodeURIComponent(parts[0]);
  const uid = parts.length > 1 ? decodeURIComponent(parts.slice(1).join("/")) : null;
  if (name !== collection || !$("records").children.length) await openCollection(name);
  else await loadNode();
  if (uid !== null && !(current && current.uid === uid && collection === name)) await openRecord(name, uid);
}

function go(name, uid) {
  const target = link(name, uid);
  if (location.hash === target) route(); else location.hash = target;
}

function value() {
  try { return JSON.parse($("value").value); }
  catch (e) { throw new Error("the value is not JSON: " + e.message); }
}

function needCollection() {
  const name = collection || $("newcollection").value.trim();
  if (!name) throw new Error("open or name a collection first");
  collection = name; return name;
}

function needUid() {
  const uid = $("uid").value;
  if (!uid) throw new Error("give the uid of the record (or pick one in the list)");
  return uid;
}

// -- 412: show the current version, reload or overwrite ------------------

function hideConflict() { conflict = null; $("conflict").hidden = true; }

async function showConflict(name, uid, retry) {
  let latest = null;
  try { latest = await call("GET", path(name, uid)); } catch (e) { /* deleted meanwhile */ }
  conflict = { name, uid, latest, retry };
  $("conflictversion").textContent = latest ? latest.version : "(deleted)";
  $("conflictvalue").textContent = latest ? JSON.stringify(latest.value, null, 2) : "";
  $("overwrite").hidden = !latest;
  $("conflict").hidden = false;
  say("412: " + name + "/" + uid + " changed since you read it");
  $("reload").focus();
}

async function guarded(name, uid, attempt) {
  const headers = current && current.uid === uid ? { "If-Match": '"' + current.version + '"' } : {};
  try { return await attempt(headers); }
  catch (e) {
    if (e.status === 412) { await showConflict(name, uid, attempt); return null; }
    throw e;
  }
}

$("reload").onclick = () => { if (conflict && conflict.latest) show(conflict.latest); else blank(); say("reloaded", true); };
$("overwrite").onclick = async () => {
  const c = conflict; if (!c || !c.latest) return;
  hideConflict();
  try {
    const result = await c.retry({ "If-Match": '"' + c.latest.version + '"' });
    done(c.name, result);
  } catch (e) { if (e.status === 412) await showConflict(c.name, c.uid, c.retry); else say(e.message); }
};

function done(name, result) {
  if (result && result.deleted) {
    blank(); say("deleted " + result.uid, true); openCollection(name); return;
  }
  show(result); say("saved " + result.uid + ", version " + result.version, true);
  openCollection(name).then(() => go(name, result.uid));
}

$("create").onclick = async () => {
  try {
    const name = needCollection(); const uid = $("uid").value;
    const record = await call("POST", uid ? path(name, uid) : path(name), { value: value() });
    show(record); say("created " + record.uid, true);
    await openCollection(name); go(name, record.uid);
  } catch (e) { say(e.message); }
};
$("save").onclick = async () => {
  try {
    const name = needCollection(); const uid = needUid(); const body = { value: value() };
    const record = await guarded(name, uid, (headers) => call("PUT", path(name, uid), body, headers));
    if (record) done(name, record);
  } catch (e) { say(e.message); }
};
$("delete").onclick = async () => {
  try {
    const name = needCollection(); const uid = needUid();
    if (!confirm("Delete " + name + "/" + uid + "?")) return;
    const result = await guarded(name, uid, (headers) => call("DELETE", path(name, uid), undefined, headers));
    if (result) done(name, result);
  } catch (e) { say(e.message); }
};
$("clear").onclick = () => { blank(); if (collection) location.hash = link(collection); };
$("more").onclick = () => openCollection(collection, true);
$("prefix").onchange = () => {
  if (!collection) return;
  prefixes[collection] = $("prefix").value; showFilter(); openCollection(collection);
};
$("clearprefix").onclick = () => { prefixes[collection] = ""; showFilter(); openCollection(collection); $("prefix").focus(); };
$("newcollection").onkeydown = (event) => {
  const n = $("newcollection").value.trim();
  if (event.key === "Enter" && n) { $("newcollection").value = ""; go(n); }
};
$("refresh").onclick = () => loadCluster();
window.addEventListener("hashchange", () => route().catch((e) => say(e.message)));
route().catch((e) => say(e.message));
loadCluster();
setInterval(() => { if (!document.hidden) loadCluster(); }, 5000);
</script>
</body>
</html>
"""
