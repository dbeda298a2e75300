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

A collection with indexed fields (``--indexes``, read from
``/_node/status``, ``*`` declarations included) also has a filter on one of
them: a field (only those indexed there are offered), an operator (``=``,
``min``, ``max``, ``gt``, ``lt``) and a value sent as typed (the API reads
it as JSON when it parses: ``2`` the number, ``"2"`` the string).  Its pages
follow the API's ``next``/``after`` cursor (Next, Previous; the browser's
Back too), and the filter and page are in the hash, e.g.
``#/books?field=value.year&op=min&value=1965``, kept per collection.  An
index still being built (503 ``index_building``) is retried after its
``Retry-After``, with a countdown; any other refusal shows its message.
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
 fieldset { min-width: 0; border: 1px solid #ddd; border-radius: 4px; margin: 0 0 .6em; padding: .3em .6em .5em; }
 legend { font-size: .9em; padding: 0 .3em; }
 .controls { display: flex; flex-wrap: wrap; gap: .3em .6em; align-items: flex-end; }
 .controls label { display: flex; flex-direction: column; min-width: 0; max-width: 100%; }
 .controls label.grow { flex: 1 1 8em; }
 select { font: inherit; max-width: 100%; }
 .controls select, .controls input { height: 2em; box-sizing: border-box; }
 .hint { font-size: .85em; color: #555; margin: .3em 0 0; }
 #fstatus { font-size: .9em; margin: .3em 0; }
 #fstatus.wait { color: #a15c00; }
 #pager button:disabled { opacity: .5; }
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
  <form id="indexfilter" hidden role="search" aria-label="filter on an indexed field">
   <fieldset><legend>Filter on an indexed field</legend>
    <div class="controls">
     <label>field <select id="ffield"></select></label>
     <label>operator <select id="fop">
      <option value="eq">= (equal)</option><option value="min">&ge; min</option><option value="max">&le; max</option>
      <option value="gt">&gt; gt</option><option value="lt">&lt; lt</option>
     </select></label>
     <label class="grow">value <input id="fvalue" aria-describedby="fhint" autocomplete="off"></label>
     <span><button id="fapply" type="submit">Filter</button><button id="fclear" type="button" hidden>Clear</button></span>
    </div>
    <p id="fhint" class="hint">Sent as typed and read as JSON when it parses: 2 is the number 2, "2" (in quotes) the string, true, false and null themselves; anything else (Dune) is a plain string. Ordered by the field's value, then uid.</p>
   </fieldset>
  </form>
  <div id="fstatus" role="status"></div><button id="fretry" type="button" hidden>Retry now</button>
  <table><thead><tr><th scope="col">uid</th><th scope="col" id="fieldcol" hidden></th><th scope="col">value</th><th scope="col">version</th><th scope="col">timestamp</th><th scope="col">lang</th></tr></thead><tbody id="records"></tbody></table>
  <button id="more" type="button" hidden>More</button>
  <nav id="pager" aria-label="pages of the filtered records" hidden><button id="prev" type="button">Previous page</button><button id="next" type="button">Next page</button></nav>
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
// Filters on indexed fields: the hash holds the one shown, with its page.
const PAGE = 50;
const OPS = { eq: "=", min: "\\u2265", max: "\\u2264", gt: ">", lt: "<" };
let indexes = {};      // "collection:field" or "*:field" -> its state, from /_node/status
const filters = {};    // collection -> {field, op, value} or null
let after = null;      // the filtered page shown starts after this cursor (null: the first page)
let trail = [];        // the cursors of the pages before it, for Previous
let nextPage = null;   // the "next" of the page shown
let shown = null;      // what the table shows: [collection, filter, page]
let shownOptions = null, shownForm = null, retry = null;

function say(text, ok) { const m = $("message"); m.textContent = text; m.className = ok ? "ok" : "error"; }
function path(c, uid) { return "/" + encodeURIComponent(c) + "/" + (uid === undefined ? "" : encodeURIComponent(uid)); }
function hashFor(c, uid, f, page) {
  let h = "#/" + encodeURIComponent(c) + (uid == null ? "" : "/" + encodeURIComponent(uid));
  if (f) {
    const q = new URLSearchParams({ field: f.field, op: f.op, value: f.value });
    if (page) q.set("after", page);
    h += "?" + q.toString();
  }
  return h;
}
function link(c, uid) { return hashFor(c, uid, filters[c], c === collection ? after : null); }
function visit(target) { if (location.hash === target) route().catch((e) => say(e.message)); else location.hash = target; }
function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td; }
function when(seconds) { return seconds == null ? "" : new Date(seconds * 1000).toISOString().replace("T", " ").replace(/\\.\\d+Z$/, "Z"); }

class HTTPError extends Error {
  constructor(status, data, retryAfter) {
    super(status + " " + ((data && (data.error + ": " + data.message)) || ""));
    this.status = status; this.data = data; this.retryAfter = retryAfter;
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
  if (!response.ok) throw new HTTPError(response.status, data, response.headers.get("Retry-After"));
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
    indexes = s.indexes || {}; showIndexFilter();
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

// -- filters on indexed fields --------------------------------------------

// {field: "ready" or "building"} of the indexes that serve collection c.
function fieldsOf(c) {
  const fields = {};
  for (const spec of Object.keys(indexes)) {
    const i = spec.lastIndexOf(":"), owner = spec.slice(0, i), field = spec.slice(i + 1);
    if (owner !== c && owner !== "*") continue;
    const state = indexes[spec].state === "ready" ? "ready" : "building";
    if (fields[field] !== "ready") fields[field] = state;
  }
  return fields;
}

function sameFilter(a, b) { return JSON.stringify(a || null) === JSON.stringify(b || null); }
function describe(f) { return f.field + " " + OPS[f.op] + " " + f.value; }
function pick(record, field) {
  let v = record;
  for (const k of field.split(".")) {
    if (v === null || typeof v !== "object" || !(k in v)) return "";
    v = v[k];
  }
  return JSON.stringify(v);
}
function fstatus(text, cls) { $("fstatus").textContent = text; $("fstatus").className = cls || ""; }
function cancelRetry() { if (retry) clearTimeout(retry); retry = null; $("fretry").hidden = true; }

// The filter form of the open collection: the fields indexed there, and
// the filter of the hash (the user's unsent edits are kept otherwise).
function showIndexFilter() {
  const fields = collection ? fieldsOf(collection) : {};
  const names = Object.keys(fields).sort();
  const f = collection ? filters[collection] || null : null;
  if (f && !(f.field in fields)) fields[f.field] = "not indexed";
  const options = JSON.stringify([collection, fields]);
  if (options !== shownOptions) {
    shownOptions = options;
    const select = $("ffield"), chosen = select.value;
    select.replaceChildren();
    for (const name of Object.keys(fields).sort()) {
      const o = document.createElement("option"); o.value = name;
      o.textContent = name + (fields[name] === "ready" ? "" : " (" + (fields[name] === "building" ? "index being built" : "not indexed") + ")");
      o.disabled = fields[name] === "not indexed";
      select.appendChild(o);
    }
    if (chosen in fields) select.value = chosen;
  }
  const form = JSON.stringify([collection, f]);
  if (form !== shownForm) {
    shownForm = form;
    if (f) { $("ffield").value = f.field; $("fop").value = f.op; $("fvalue").value = f.value; }
    else { $("fop").value = "eq"; $("fvalue").value = ""; }
  }
  $("indexfilter").hidden = !names.length && !f;
  $("fclear").hidden = !f;
  $("pager").hidden = !f;
  $("fieldcol").hidden = !f; $("fieldcol").textContent = f ? f.field : "";
  $("prefix").disabled = !!f;
  $("prefix").placeholder = f ? "not with a filter on an indexed field" : "any uid";
  $("filter").hidden = !!f || !(prefixes[collection] || "");
  if (!f) fstatus("");
}

// 503 index_building: say so, count down its Retry-After, then ask again.
function waitForIndex(e, f) {
  let left = Math.max(1, parseInt(e.retryAfter, 10) || 1);
  const view = shown;
  $("fretry").hidden = false;
  const tick = () => {
    if (shown !== view) return;
    if (left <= 0) { retry = null; openCollection(collection); return; }
    fstatus("The index on " + f.field + " is being built: retrying in " + left + " s. (" +
      ((e.data && e.data.message) || "") + ")", "wait");
    left -= 1; retry = setTimeout(tick, 1000);
  };
  tick();
}

function hashUid() {
  const raw = location.hash.replace(/^#\\/?/, "").split("?")[0].split("/");
  return raw.length > 1 ? decodeURIComponent(raw.slice(1).join("/")) : null;
}

$("indexfilter").onsubmit = (event) => {
  event.preventDefault();
  if (!collection || !$("ffield").value) return;
  const f = { field: $("ffield").value, op: $("fop").value, value: $("fvalue").value };
  shown = null; visit(hashFor(collection, hashUid(), f, null));
};
$("fclear").onclick = () => { visit(hashFor(collection, hashUid(), null, null)); $("fvalue").focus(); };
$("next").onclick = () => { if (nextPage) visit(hashFor(collection, hashUid(), filters[collection], nextPage)); };
$("prev").onclick = () => {
  if (after) visit(hashFor(collection, hashUid(), filters[collection], trail.length ? trail[trail.length - 1] : null));
};
$("fretry").onclick = () => { cancelRetry(); openCollection(collection); };

async function openCollection(name, more) {
  if (name !== collection) { collection = name; showFilter(); }
  cancelRetry();
  showIndexFilter();
  $("title").textContent = "Records in " + name;
  const f = filters[name] || null;
  if (!more) { cursor = null; $("records").replaceChildren(); }
  let url = path(name) + "?limit=" + PAGE;
  if (f) {
    url += "&" + (f.op === "eq" ? "" : f.op + "_") + f.field + "=" + encodeURIComponent(f.value);
    if (after) url += "&after=" + encodeURIComponent(after);
  } else {
    if (cursor) url += "&after=" + encodeURIComponent(cursor);
    if (prefixes[name]) url += "&prefix=" + encodeURIComponent(prefixes[name]);
  }
  const view = shown = JSON.stringify([name, f, f ? after : null]);
  $("more").hidden = true;
  if (f) { $("prev").disabled = !after; $("next").disabled = true; fstatus("filtering on " + describe(f) + "\\u2026"); }
  try {
    const page = await call("GET", url);
    if (shown !== view) return;   // another view was asked for meanwhile
    for (const record of page.items) {
      const tr = document.createElement("tr"); tr.dataset.uid = record.uid;
      const a = document.createElement("a"); a.href = link(name, record.uid); a.textContent = record.uid;
      cell(tr, "").appendChild(a);
      if (f) cell(tr, pick(record, f.field), "mono");
      cell(tr, JSON.stringify(record.value), "value");
      cell(tr, record.version, "mono"); cell(tr, when(record.timestamp), "mono");
      cell(tr, record.lang == null ? "" : record.lang);
      if (current && current.uid === record.uid) tr.className = "current";
      $("records").appendChild(tr);
    }
    if (f) {
      nextPage = page.next; $("next").disabled = !nextPage;
      fstatus(describe(f) + ": " + page.items.length + (page.items.length === 1 ? " record" : " records") +
        (after ? " on this page" : "") + (nextPage ? ", more on the next page" : ""), "ok");
    } else { cursor = page.next; $("more").hidden = !cursor; }
    await loadNode();
  } catch (e) {
    if (shown !== view) return;
    if (f && e.status === 503 && e.data && e.data.error === "index_building") waitForIndex(e, f);
    else if (f) fstatus(e.message, "error");
    else say(e.message);
  }
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

// The hash is the state: #/collection or #/collection/uid, then the
// filter on an indexed field and its page: ?field=F&op=OP&value=V&after=C.
async function route() {
  const raw = location.hash.replace(/^#\\/?/, ""), q = raw.indexOf("?");
  const parts = (q < 0 ? raw : raw.slice(0, q)).split("/");
  const params = new URLSearchParams(q < 0 ? "" : raw.slice(q + 1));
  if (!parts[0]) { await loadNode(); return; }
  const name = decodeURIComponent(parts[0]);
  const uid = parts.length > 1 ? decodeURIComponent(parts.slice(1).join("/")) : null;
  const op = params.get("op");
  const f = params.get("field") ?
    { field: params.get("field"), op: Object.hasOwn(OPS, op) ? op : "eq", value: params.get("value") || "" } : null;
  const page = f ? params.get("after") || null : null;
  if (name !== collection || !sameFilter(f, filters[name])) trail = [];   // another filter: its first page is the start
  else if (page !== after) {   // another page of it: Next, Previous, Back, Forward
    if (page === null) trail = [];
    else if (trail.length && trail[trail.length - 1] === page) trail.pop();
    else trail.push(after);
  }
  filters[name] = f;
  after = page;
  if (JSON.stringify([name, f, page]) !== shown || !$("records").children.length) await openCollection(name);
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
