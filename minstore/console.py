"""
The HTML console served at ``GET /`` to a browser: browse collections, and
create, edit and delete records.  One static page: it talks to the same
JSON API as any client, so it needs no route of its own.
"""

CONSOLE_HTML = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>minstore console</title>
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; }
 header { background: #243447; color: #fff; padding: .6em 1em; display: flex; gap: 1em; align-items: baseline; }
 header h1 { font-size: 1.2em; margin: 0; }
 header small { opacity: .8; }
 main { display: grid; grid-template-columns: 14em 1fr 26em; gap: 1em; padding: 1em; }
 section { border: 1px solid #ddd; border-radius: 4px; padding: .6em; overflow: auto; }
 h2 { font-size: 1em; margin: 0 0 .5em; }
 ul { list-style: none; padding: 0; margin: 0; }
 li a { cursor: pointer; color: #0b5cad; }
 li.active a { font-weight: bold; }
 table { border-collapse: collapse; width: 100%; }
 td, th { text-align: left; padding: .25em .4em; border-bottom: 1px solid #eee; vertical-align: top; }
 td.value { font-family: monospace; max-width: 30em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
 tr.record { cursor: pointer; } tr.record:hover { background: #f4f8fc; }
 input, textarea { width: 100%; box-sizing: border-box; font: inherit; }
 textarea { font-family: monospace; min-height: 12em; }
 button { margin: .4em .3em 0 0; }
 #message { margin-top: .6em; white-space: pre-wrap; }
 .error { color: #b00020; } .ok { color: #1b7f3b; }
 .meta { font-family: monospace; font-size: .85em; color: #555; word-break: break-all; }
</style>
</head>
<body>
<header><h1>minstore</h1><small id="node"></small></header>
<main>
 <section>
  <h2>Collections</h2>
  <ul id="collections"></ul>
  <p><input id="newcollection" placeholder="open a collection"></p>
 </section>
 <section>
  <h2 id="title">Records</h2>
  <p><input id="prefix" placeholder="uid prefix"></p>
  <table><thead><tr><th>uid</th><th>value</th><th>lang</th></tr></thead><tbody id="records"></tbody></table>
  <button id="more" hidden>More</button>
 </section>
 <section>
  <h2>Record</h2>
  <label>uid <input id="uid" placeholder="empty: generated on create"></label>
  <label>value (JSON) <textarea id="value">"hello world"</textarea></label>
  <div class="meta" id="meta"></div>
  <button id="create">Create</button><button id="save">Save</button><button id="delete">Delete</button><button id="clear">New</button>
  <div id="message"></div>
 </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let collection = null, cursor = null, current = null;

function say(text, ok) { const m = $("message"); m.textContent = text; m.className = ok ? "ok" : "error"; }
function path(c, uid) { return "/" + encodeURIComponent(c) + "/" + (uid === undefined ? "" : encodeURIComponent(uid)); }

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
  if (!response.ok) throw new Error(response.status + " " + ((data && (data.error + ": " + data.message)) || ""));
  return data;
}

async function loadNode() {
  const info = await call("GET", "/");
  $("node").textContent = "node " + info.node_id + " \\u00b7 version " + info.version;
  const list = $("collections"); list.replaceChildren();
  for (const name of info.collections) {
    const li = document.createElement("li"); const a = document.createElement("a");
    a.textContent = name; a.onclick = () => openCollection(name);
    if (name === collection) li.className = "active";
    li.appendChild(a); list.appendChild(li);
  }
}

async function openCollection(name, more) {
  collection = name; $("title").textContent = "Records in " + name;
  if (!more) { cursor = null; $("records").replaceChildren(); }
  let url = path(name) + "?limit=50";
  if (cursor) url += "&after=" + encodeURIComponent(cursor);
  if ($("prefix").value) url += "&prefix=" + encodeURIComponent($("prefix").value);
  try {
    const page = await call("GET", url);
    for (const record of page.items) {
      const tr = document.createElement("tr"); tr.className = "record";
      for (const text of [record.uid, JSON.stringify(record.value), record.lang == null ? "" : record.lang]) {
        const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
      }
      tr.children[1].className = "value";
      tr.onclick = () => show(record);
      $("records").appendChild(tr);
    }
    cursor = page.next; $("more").hidden = !cursor;
    loadNode();
  } catch (e) { say(e.message); }
}

function show(record) {
  current = record;
  $("uid").value = record.uid;
  $("value").value = JSON.stringify(record.value, null, 2);
  const meta = Object.assign({}, record); delete meta.value;
  $("meta").textContent = JSON.stringify(meta);
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

$("create").onclick = async () => {
  try {
    const name = needCollection(); const uid = $("uid").value;
    const record = await call("POST", uid ? path(name, uid) : path(name), { value: value() });
    show(record); say("created " + record.uid, true); openCollection(name);
  } catch (e) { say(e.message); }
};
$("save").onclick = async () => {
  try {
    const name = needCollection();
    const headers = current && current.uid === $("uid").value ? { "If-Match": '"' + current.version + '"' } : {};
    const record = await call("PUT", path(name, $("uid").value), { value: value() }, headers);
    show(record); say("saved version " + record.version, true); openCollection(name);
  } catch (e) { say(e.message); }
};
$("delete").onclick = async () => {
  try {
    const name = needCollection(); const uid = $("uid").value;
    if (!confirm("Delete " + name + "/" + uid + "?")) return;
    const headers = current && current.uid === uid ? { "If-Match": '"' + current.version + '"' } : {};
    await call("DELETE", path(name, uid), undefined, headers);
    current = null; $("meta").textContent = ""; say("deleted " + uid, true); openCollection(name);
  } catch (e) { say(e.message); }
};
$("clear").onclick = () => { current = null; $("uid").value = ""; $("value").value = '""'; $("meta").textContent = ""; };
$("more").onclick = () => openCollection(collection, true);
$("prefix").onchange = () => collection && openCollection(collection);
$("newcollection").onchange = () => { const n = $("newcollection").value.trim(); if (n) openCollection(n); };
loadNode().catch((e) => say(e.message));
</script>
</body>
</html>
"""
